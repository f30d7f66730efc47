//! `berth run`: start a run, stream its output to our own stdout and stderr, exit with the command's exit code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::client::{ClientArgs, Session};

/// Exit code when the command timed out (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code when berth itself failed before or instead of running the command.
pub const EXIT_BERTH_FAILED: u8 = 125;
/// Exit code when the run was cancelled (as for SIGINT).
pub const EXIT_CANCELLED: u8 = 130;

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
    #[command(flatten)]
    pub client: ClientArgs,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    match start_and_follow(args).await {
        Ok(code) => Ok(code),
        Err(error) => {
            eprintln!("berth: {error:#}");
            Ok(ExitCode::from(EXIT_BERTH_FAILED))
        }
    }
}

async fn start_and_follow(args: RunArgs) -> anyhow::Result<ExitCode> {
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
    if let Some(seconds) = args.timeout {
        anyhow::ensure!(seconds > 0.0, "--timeout must be positive");
        body["timeoutMs"] = json!((seconds * 1000.0).ceil() as u64);
    }
    if let Some(cwd) = &args.cwd {
        body["cwd"] = json!(cwd);
    }
    let json_output = args.client.json;
    let session = Session::open(args.client).await?;
    let run = session
        .api
        .post(
            &format!("/api/companies/{}/runs", session.company_id),
            &body,
        )
        .await?;
    let run_id = run["id"]
        .as_str()
        .context("the server returned no run id")?
        .to_owned();

    let mut after = 0i64;
    let mut cancel_sent = false;
    let mut reconnects = 0;
    loop {
        let response = session
            .api
            .stream(&format!("/api/runs/{run_id}/events?after={after}"))
            .await?;
        let mut body = response.bytes_stream();
        let mut buffer = Vec::new();
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                _ = tokio::signal::ctrl_c(), if !cancel_sent => {
                    cancel_sent = true;
                    eprintln!("berth: cancelling run {run_id}");
                    let _ = session.api.post(&format!("/api/runs/{run_id}/cancel"), &json!({})).await;
                    continue;
                }
            };
            let Some(Ok(chunk)) = chunk else { break };
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
                    return Ok(ExitCode::from(code));
                }
            }
        }
        // The stream ended before the final event: the server restarted or the connection dropped. Pick up where
        // we left off.
        reconnects += 1;
        anyhow::ensure!(reconnects <= 5, "lost the event stream of run {run_id}");
        tokio::time::sleep(std::time::Duration::from_millis(200 * reconnects)).await;
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

fn render(event: &Value) -> anyhow::Result<()> {
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

    #[test]
    fn sse_blocks_parse() {
        let buffer = b"id: 1\nevent: stdout\ndata: {\"seq\":1}\n\n: keep-alive\n\n";
        let end = find_event_end(buffer).unwrap();
        assert_eq!(parse_sse_data(&buffer[..end]), Some(json!({"seq": 1})));
        assert_eq!(parse_sse_data(&buffer[end..]), None);
    }
}
