//! `berth run`: start a run, stream its output to our own stdout and stderr, exit with the command's exit code.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;

use crate::api::json::MAX_BODY_BYTES;
use crate::client::{ClientArgs, ClientError, Session};

/// Exit code when the command timed out (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when berth itself failed before or instead of running the command.
pub const EXIT_BERTH_FAILED: u8 = 125;
/// Exit code when the run was cancelled (as for SIGINT).
pub const EXIT_CANCELLED: u8 = 130;
/// Exit code when berth lost the run after starting it (the server went away): its outcome is unknown. 255, as
/// `ssh` exits when it loses the connection to a command it started; 126 and 127 already mean "cannot execute" and
/// "not found" to shells.
pub const EXIT_RUN_LOST: u8 = 255;

/// Exit code when the user stopped following with Ctrl-C (as a shell reports SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// How often the event stream is reopened before the run counts as lost, waiting 200 ms longer each time (3 s in
/// all): enough to ride out a dropped connection or a quick server restart.
const MAX_RECONNECTS: u32 = 5;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Environment id [default: the company's Local environment].
    #[arg(long = "env")]
    pub environment: Option<String>,
    /// Directory to run in (local) or to copy in and back (sandboxes).
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Kill the command's whole process tree after this many seconds (exit code 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Environment variable for the command, NAME=VALUE (repeatable). Prefer this over the command line for
    /// secrets: berth never puts env values in any process's argv.
    #[arg(short = 'e', long = "env-var", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the workspace (relative).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Do not send our stdin to the command (as `ssh -n`). Without it, stdin that is not a terminal is read to its
    /// end and sent (UTF-8, within the API's 1 MiB request limit), so in a script whose stdin stays open, or a loop
    /// reading its own input, pass --no-stdin.
    #[arg(long)]
    pub no_stdin: bool,
    #[command(flatten)]
    pub client: ClientArgs,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Why `berth run` ended without the command's own exit code.
#[derive(Debug)]
enum Failure {
    /// Nothing was started: the command never ran.
    BeforeStart(anyhow::Error),
    /// The run was accepted, then we lost track of it: it may have run, may still be running.
    Lost {
        run_id: String,
        error: anyhow::Error,
    },
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    match start_and_follow(args).await {
        Ok(code) => Ok(code),
        Err(Failure::BeforeStart(error)) => {
            eprintln!("berth: {error:#}");
            Ok(ExitCode::from(EXIT_BERTH_FAILED))
        }
        Err(Failure::Lost { run_id, error }) => {
            eprintln!(
                "berth: lost run {run_id} after it started, its outcome is unknown: {error:#}"
            );
            Ok(ExitCode::from(EXIT_RUN_LOST))
        }
    }
}

async fn start_and_follow(args: RunArgs) -> Result<ExitCode, Failure> {
    let json_output = args.client.json;
    let timeout_ms = timeout_ms(args.timeout).map_err(Failure::BeforeStart)?;
    let body = run_request(&args, timeout_ms)
        .await
        .map_err(Failure::BeforeStart)?;
    let session = Session::open(args.client)
        .await
        .map_err(Failure::BeforeStart)?;
    let run = session
        .api
        .post(
            &format!("/api/companies/{}/runs", session.company_id),
            &body,
        )
        .await
        .map_err(|error| Failure::BeforeStart(error.into()))?;
    let run_id = run["id"]
        .as_str()
        .context("the server returned no run id")
        .map_err(Failure::BeforeStart)?
        .to_owned();
    match follow(&session, &run_id, json_output, OnInterrupt::CancelRun).await {
        Ok(code) => {
            if code == EXIT_TIMED_OUT {
                // The final event says only `timed_out`: without a word the 124 looks like the command's own code.
                match timeout_ms {
                    Some(ms) => eprintln!("berth: the command timed out after {ms} ms"),
                    None => eprintln!("berth: the command timed out"),
                }
            }
            Ok(ExitCode::from(code))
        }
        Err(error) => Err(Failure::Lost { run_id, error }),
    }
}

fn timeout_ms(seconds: Option<f64>) -> anyhow::Result<Option<u64>> {
    let Some(seconds) = seconds else {
        return Ok(None);
    };
    anyhow::ensure!(seconds > 0.0, "--timeout must be positive");
    Ok(Some((seconds * 1000.0).ceil() as u64))
}

/// The run request's body, checked against the API's body limit here so that too much stdin is refused with the
/// reason before anything starts, rather than as a bare 413.
async fn run_request(args: &RunArgs, timeout_ms: Option<u64>) -> anyhow::Result<Value> {
    let mut env = Map::new();
    for pair in &args.env {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("`{pair}` is not NAME=VALUE"))?;
        env.insert(name.to_owned(), Value::String(value.to_owned()));
    }
    let mut body = json!({"command": args.command, "env": env});
    if let Some(environment) = &args.environment {
        body["environmentId"] = json!(environment);
    }
    if let Some(workspace) = &args.workspace {
        let absolute = std::fs::canonicalize(workspace)
            .with_context(|| format!("workspace {}", workspace.display()))?;
        body["workspace"] = json!({"localPath": absolute});
    }
    if let Some(ms) = timeout_ms {
        body["timeoutMs"] = json!(ms);
    }
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    // A terminal is left alone: reading it would wait for the user to type an end-of-file.
    let stdin = if args.no_stdin || std::io::stdin().is_terminal() {
        None
    } else {
        read_stdin(tokio::io::stdin()).await?
    };
    let has_stdin = stdin.is_some();
    if let Some(text) = stdin {
        body["stdin"] = json!(text);
    }
    let size = serde_json::to_vec(&body)
        .context("cannot encode the run request")?
        .len();
    if size > MAX_BODY_BYTES {
        let what = if has_stdin { " with stdin" } else { "" };
        anyhow::bail!(
            "the run request{what} is {size} bytes once JSON-encoded, over the API's limit of 1 MiB \
             ({MAX_BODY_BYTES} bytes); pass large input as a file in --workspace instead"
        );
    }
    Ok(body)
}

/// Reads `input` to its end, refusing more than one run request can carry; `None` when it is empty.
async fn read_stdin(input: impl tokio::io::AsyncRead + Unpin) -> anyhow::Result<Option<String>> {
    let mut bytes = Vec::new();
    // One byte past the limit tells "too much" from "exactly the limit" without reading on without bound.
    input
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .context("cannot read stdin")?;
    anyhow::ensure!(
        bytes.len() <= MAX_BODY_BYTES,
        "stdin is larger than 1 MiB ({MAX_BODY_BYTES} bytes), the most the API accepts in one run request; pass \
         large input as a file in --workspace instead, or --no-stdin to send none"
    );
    if bytes.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8(bytes)
        .context("stdin is not UTF-8 text, and the API carries a run's stdin as a JSON string")?;
    Ok(Some(text))
}

/// What Ctrl-C means while following a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnInterrupt {
    /// `berth run`: the user started the command and wants it stopped; the final event then ends the stream.
    CancelRun,
    /// `berth runs logs -f`: the user only watches; stop watching and leave the run alone.
    StopFollowing,
}

/// Streams the run's events from `after` until the final one, and returns the exit code it implies. An error means
/// the run was lost: the server stopped answering, or stopped knowing it.
pub(crate) async fn follow(
    session: &Session,
    run_id: &str,
    json_output: bool,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<u8> {
    follow_from(session, run_id, 0, json_output, on_interrupt).await
}

/// [`follow`], starting after event `after`.
pub(crate) async fn follow_from(
    session: &Session,
    run_id: &str,
    after: i64,
    json_output: bool,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<u8> {
    let mut after = after;
    let mut cancel_sent = false;
    let mut reconnects = 0u32;
    loop {
        let why_ended = match session
            .api
            .stream(&format!("/api/runs/{run_id}/events?after={after}"))
            .await
        {
            Ok(response) => {
                let mut body = response.bytes_stream();
                let mut buffer = Vec::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        _ = tokio::signal::ctrl_c(), if !cancel_sent => {
                            if on_interrupt == OnInterrupt::StopFollowing {
                                return Ok(EXIT_INTERRUPTED);
                            }
                            cancel_sent = true;
                            eprintln!("berth: cancelling run {run_id}");
                            let _ = session.api.post(&format!("/api/runs/{run_id}/cancel"), &json!({})).await;
                            continue;
                        }
                    };
                    let chunk = match chunk {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(error)) => {
                            break anyhow::Error::new(error).context("the event stream broke off");
                        }
                        None => break anyhow::anyhow!("the event stream ended before the run did"),
                    };
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = find_event_end(&buffer) {
                        let block: Vec<u8> = buffer.drain(..end).collect();
                        let Some(event) = parse_sse_data(&block) else {
                            continue;
                        };
                        after = event["seq"].as_i64().unwrap_or(after);
                        if json_output {
                            println!("{event}");
                        } else {
                            render(&event)?;
                        }
                        if let Some(code) = final_exit_code(&event) {
                            return Ok(code);
                        }
                    }
                }
            }
            // The server may be restarting: try again. An answer that it does not know the run (or us) is final.
            Err(error @ ClientError::Unreachable { .. }) => anyhow::Error::new(error),
            Err(error) if error.status().is_some_and(|status| status >= 500) => {
                anyhow::Error::new(error)
            }
            Err(error) => return Err(error.into()),
        };
        // The stream ended before the final event: the server restarted or the connection dropped. Pick up where
        // we left off.
        reconnects += 1;
        if reconnects > MAX_RECONNECTS {
            return Err(why_ended);
        }
        tokio::time::sleep(std::time::Duration::from_millis(
            200 * u64::from(reconnects),
        ))
        .await;
    }
}

/// Index just past the blank line that ends the first complete SSE event in `buffer`.
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(2)
        .position(|pair| pair == b"\n\n")
        .map(|index| index + 2)
}

fn parse_sse_data(block: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(block).ok()?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    if data.is_empty() {
        return None; // keep-alive comment
    }
    serde_json::from_str(&data.join("\n")).ok()
}

pub(crate) fn render(event: &Value) -> anyhow::Result<()> {
    let text = event["data"]["text"].as_str().unwrap_or_default();
    match event["type"].as_str() {
        Some("stdout") => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
        Some("stderr") => {
            let mut stderr = std::io::stderr().lock();
            stderr.write_all(text.as_bytes())?;
            stderr.flush()?;
        }
        Some("error") => eprintln!(
            "berth: {}",
            event["data"]["message"].as_str().unwrap_or("error")
        ),
        _ => {}
    }
    Ok(())
}

/// The exit code `berth run` ends with, once the final status event arrives.
fn final_exit_code(event: &Value) -> Option<u8> {
    if event["type"] != "status" {
        return None;
    }
    let data = &event["data"];
    let code = match data["status"].as_str()? {
        "queued" | "running" => return None,
        "timed_out" => EXIT_TIMED_OUT,
        "cancelled" => EXIT_CANCELLED,
        _ => match (data["exitCode"].as_i64(), data["signal"].as_str()) {
            (Some(code), _) => u8::try_from(code.clamp(0, 255)).unwrap_or(1),
            (None, Some(signal)) => 128u8.saturating_add(signal_number(signal)),
            (None, None) => EXIT_BERTH_FAILED,
        },
    };
    Some(code)
}

/// Shell convention: a command killed by signal N exits 128 + N.
fn signal_number(name: &str) -> u8 {
    match name {
        "SIGHUP" => 1,
        "SIGINT" => 2,
        "SIGQUIT" => 3,
        "SIGILL" => 4,
        "SIGABRT" => 6,
        "SIGKILL" => 9,
        "SIGSEGV" => 11,
        "SIGPIPE" => 13,
        "SIGTERM" => 15,
        other => other
            .strip_prefix("SIG")
            .and_then(|number| number.parse().ok())
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let status = |data: Value| json!({"type": "status", "data": data});
        assert_eq!(final_exit_code(&status(json!({"status": "running"}))), None);
        assert_eq!(
            final_exit_code(&status(json!({"status": "succeeded", "exitCode": 0}))),
            Some(0)
        );
        assert_eq!(
            final_exit_code(&status(json!({"status": "failed", "exitCode": 3}))),
            Some(3)
        );
        assert_eq!(
            final_exit_code(&status(json!({"status": "timed_out", "exitCode": null}))),
            Some(124)
        );
        assert_eq!(
            final_exit_code(&status(json!({"status": "failed", "exitCode": null}))),
            Some(125)
        );
        assert_eq!(
            final_exit_code(&status(json!({"status": "failed", "signal": "SIGKILL"}))),
            Some(137)
        );
        assert_eq!(
            final_exit_code(&json!({"type": "stdout", "data": {"text": "x"}})),
            None
        );
    }

    #[tokio::test]
    async fn stdin_is_read_within_the_body_limit() {
        assert_eq!(read_stdin(&b""[..]).await.unwrap(), None);
        assert_eq!(
            read_stdin(&b"text\n"[..]).await.unwrap().as_deref(),
            Some("text\n")
        );
        let limit = vec![b'a'; MAX_BODY_BYTES];
        assert_eq!(
            read_stdin(&limit[..]).await.unwrap().map(|text| text.len()),
            Some(MAX_BODY_BYTES)
        );
        let over = vec![b'a'; MAX_BODY_BYTES + 1];
        let error = read_stdin(&over[..]).await.unwrap_err().to_string();
        assert!(error.contains("larger than 1 MiB"), "{error}");
        let error = read_stdin(&[0xffu8][..]).await.unwrap_err().to_string();
        assert!(error.contains("not UTF-8"), "{error}");
    }

    #[test]
    fn sse_blocks_parse() {
        let buffer = b"id: 1\nevent: stdout\ndata: {\"seq\":1}\n\n: keep-alive\n\n";
        let end = find_event_end(buffer).unwrap();
        assert_eq!(parse_sse_data(&buffer[..end]), Some(json!({"seq": 1})));
        assert_eq!(parse_sse_data(&buffer[end..]), None);
    }
}
