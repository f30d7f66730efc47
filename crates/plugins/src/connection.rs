//! The host's end of one plugin process's stdio: JSON-RPC requests matched to their responses by id, output
//! notifications routed to the execution they belong to, and the first protocol error closing the connection.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::PluginError;
use crate::wire::{self, Incoming, Outgoing, OutputNotification, RpcError};

/// Output chunks buffered per execution before the reader waits for the run to take them: backpressure reaches the
/// plugin's stdout instead of growing memory.
const OUTPUT_BUFFER: usize = 64;

/// How much of the plugin's stdout one read takes: a line of output is about 350 KiB (256 KiB of output in base64),
/// and reading it in 8 KiB pieces costs a system call and a copy for each.
const READ_BUFFER: usize = 1024 * 1024;

type Reply = Result<Value, RpcError>;

/// A live JSON-RPC connection to one plugin process. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Connection {
    plugin: Arc<str>,
    lines: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    executions: Mutex<HashMap<String, mpsc::Sender<OutputChunk>>>,
    closed: CancellationToken,
    /// Why the connection closed, when the plugin broke the protocol.
    protocol_error: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One `environmentExecuteOutput` notification as the host hands it to its execution: the data decoded.
#[derive(Debug)]
pub struct OutputChunk {
    pub stream: wire::Stream,
    /// The byte offset of `data` in its stream, as the plugin said.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The receiving end of one execution's output notifications; unregisters itself when dropped.
#[derive(Debug)]
pub struct OutputSubscription {
    pub(crate) chunks: mpsc::Receiver<OutputChunk>,
    execution_id: String,
    shared: Arc<Shared>,
}

impl OutputSubscription {
    /// The next chunk; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<OutputChunk> {
        self.chunks.recv().await
    }

    /// A chunk already received, without waiting.
    pub fn try_recv(&mut self) -> Option<OutputChunk> {
        self.chunks.try_recv().ok()
    }
}

impl Drop for OutputSubscription {
    fn drop(&mut self) {
        lock(&self.shared.executions).remove(&self.execution_id);
    }
}

impl Connection {
    /// Starts reading `stdout` and writing `stdin` of a plugin.
    pub(crate) fn start(
        plugin: &str,
        stdout: impl AsyncRead + Unpin + Send + 'static,
        stdin: impl AsyncWrite + Unpin + Send + 'static,
    ) -> Self {
        let (lines, outgoing) = mpsc::unbounded_channel();
        let connection = Self {
            plugin: Arc::from(plugin),
            lines,
            shared: Arc::new(Shared::default()),
        };
        tokio::spawn(write_loop(
            stdin,
            outgoing,
            connection.shared.closed.clone(),
        ));
        let reader = connection.clone();
        tokio::spawn(async move {
            let error = reader
                .read_loop(BufReader::with_capacity(READ_BUFFER, stdout))
                .await;
            if let Err(message) = error {
                tracing::warn!(plugin.id = %reader.plugin, %message, "plugin broke the protocol; restarting it");
                *lock(&reader.shared.protocol_error) = Some(message);
            }
            reader.close();
        });
        connection
    }

    /// Resolves once the connection is closed (the plugin exited, closed stdout, or broke the protocol).
    pub(crate) async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    /// Whether the connection is closed: a plugin state still `ready` can hold a closed one for a moment, until the
    /// supervisor notices.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// The protocol error that closed the connection, if that is what closed it.
    pub(crate) fn protocol_error(&self) -> Option<String> {
        lock(&self.shared.protocol_error).clone()
    }

    /// Fails every call in flight and stops reading: the process is gone (or is being stopped), even if something
    /// else still holds its stdout open.
    pub(crate) fn close(&self) {
        self.shared.closed.cancel();
        // Dropping the senders fails every call in flight at once.
        lock(&self.shared.pending).clear();
        lock(&self.shared.executions).clear();
    }

    /// Sends a request and waits for its result, at most `deadline`.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &'static str,
        params: &P,
        deadline: Duration,
    ) -> Result<R, PluginError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let line = encode(&Outgoing {
            jsonrpc: "2.0",
            id: Some(id),
            method,
            params,
        })
        .map_err(|message| self.protocol(message))?;
        let (reply, answer) = oneshot::channel();
        lock(&self.shared.pending).insert(id, reply);
        if self.shared.closed.is_cancelled() || self.lines.send(line).is_err() {
            lock(&self.shared.pending).remove(&id);
            return Err(self.exited(method));
        }
        let answer = match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_closed)) => return Err(self.exited(method)),
            Err(_elapsed) => {
                lock(&self.shared.pending).remove(&id);
                return Err(PluginError::Deadline {
                    plugin: self.plugin.to_string(),
                    method,
                    deadline,
                });
            }
        };
        match answer {
            Ok(value) => serde_json::from_value(value).map_err(|error| {
                self.protocol(format!(
                    "the answer to {method} has the wrong shape: {error}"
                ))
            }),
            Err(error) => Err(PluginError::Remote {
                plugin: self.plugin.to_string(),
                code: error.code,
                message: error.message,
            }),
        }
    }

    /// Sends a notification (no answer comes back), such as `environmentExecuteInput` after an execute with
    /// `stdinStream`. It is queued behind every line sent before it, so it reaches the plugin after that call.
    pub async fn notify<P: Serialize>(
        &self,
        method: &'static str,
        params: &P,
    ) -> Result<(), PluginError> {
        let line = encode(&Outgoing {
            jsonrpc: "2.0",
            id: None,
            method,
            params,
        })
        .map_err(|message| self.protocol(message))?;
        if self.shared.closed.is_cancelled() || self.lines.send(line).is_err() {
            return Err(self.exited(method));
        }
        Ok(())
    }

    /// Starts collecting the output notifications of `execution_id`. Call before sending the execute request.
    pub fn subscribe_output(&self, execution_id: &str) -> OutputSubscription {
        let (sender, chunks) = mpsc::channel(OUTPUT_BUFFER);
        lock(&self.shared.executions).insert(execution_id.to_owned(), sender);
        OutputSubscription {
            chunks,
            execution_id: execution_id.to_owned(),
            shared: self.shared.clone(),
        }
    }

    fn exited(&self, method: &'static str) -> PluginError {
        match self.protocol_error() {
            Some(message) => self.protocol(message),
            None => PluginError::Exited {
                plugin: self.plugin.to_string(),
                method,
            },
        }
    }

    fn protocol(&self, message: String) -> PluginError {
        PluginError::Protocol {
            plugin: self.plugin.to_string(),
            message,
        }
    }

    /// Reads lines until the plugin closes stdout (`Ok`) or breaks the protocol (`Err` with what it did).
    async fn read_loop(&self, mut stdout: impl AsyncBufRead + Unpin) -> Result<(), String> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut stdout)
                .take(wire::MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|error| format!("reading stdout: {error}"))?;
            if read == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') {
                if line.len() > wire::MAX_LINE_BYTES {
                    return Err(format!(
                        "a line longer than {} MiB",
                        wire::MAX_LINE_BYTES / (1024 * 1024)
                    ));
                }
                // The last line, cut short by exit: nothing to answer.
                return Ok(());
            }
            let text = &line[..line.len() - 1];
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            self.dispatch(text).await?;
        }
    }

    async fn dispatch(&self, line: &[u8]) -> Result<(), String> {
        // Most lines are output: those are read straight into their chunk. Everything else, and whatever is not
        // quite an output notification, is judged below.
        if let Some((execution_id, chunk)) = output_notification(line) {
            return self.output(&execution_id, chunk).await;
        }
        // The line itself is not quoted: a plugin could have printed its config, secrets and all.
        let message: Incoming = serde_json::from_slice(line).map_err(|error| {
            format!(
                "a line that is not JSON-RPC ({error}; {} bytes)",
                line.len()
            )
        })?;
        if message.jsonrpc != "2.0" {
            return Err(format!(
                "jsonrpc must be \"2.0\", not {:?}",
                message.jsonrpc
            ));
        }
        match (message.method, message.id) {
            (Some(method), None) => {
                self.notification(&method, message.params.unwrap_or(Value::Null))
                    .await
            }
            (Some(method), Some(id)) => {
                // Protocol v1 defines no requests from the plugin.
                let response = wire::Response {
                    jsonrpc: "2.0",
                    id: &id,
                    result: None,
                    error: Some(RpcError {
                        code: wire::METHOD_NOT_FOUND,
                        message: format!("the host has no method {method:?}"),
                        data: None,
                    }),
                };
                let line = encode(&response)?;
                let _closed = self.lines.send(line);
                Ok(())
            }
            (None, Some(id)) => {
                let id = id
                    .as_u64()
                    .ok_or_else(|| format!("a response with an id the host never sent: {id}"))?;
                let reply = match (message.result, message.error) {
                    (_, Some(error)) => Err(error),
                    (Some(result), None) => Ok(result),
                    (None, None) => Ok(Value::Null),
                };
                // A missing entry is a call that already timed out: its late answer is dropped.
                let waiter = lock(&self.shared.pending).remove(&id);
                if let Some(waiter) = waiter {
                    let _gone = waiter.send(reply);
                }
                Ok(())
            }
            (None, None) => Err("a message with neither method nor id".to_owned()),
        }
    }

    async fn notification(&self, method: &str, params: Value) -> Result<(), String> {
        if method != wire::EXECUTE_OUTPUT {
            tracing::debug!(plugin.id = %self.plugin, method, "ignored an unknown notification");
            return Ok(());
        }
        let notification: OutputNotification = serde_json::from_value(params)
            .map_err(|error| format!("{} has the wrong shape: {error}", wire::EXECUTE_OUTPUT))?;
        let data = decode_output(notification.data.as_bytes())
            .map_err(|error| format!("output that is not base64: {error}"))?;
        let chunk = OutputChunk {
            stream: notification.stream,
            offset: notification.offset,
            data,
        };
        self.output(&notification.execution_id, chunk).await
    }

    /// Hands a chunk of output to its execution.
    async fn output(&self, execution_id: &str, chunk: OutputChunk) -> Result<(), String> {
        let subscriber = lock(&self.shared.executions).get(execution_id).cloned();
        match subscriber {
            // Waiting here is the backpressure: the plugin's stdout is not read while the run catches up.
            Some(subscriber) => {
                let _finished = subscriber.send(chunk).await;
            }
            None => {
                tracing::debug!(plugin.id = %self.plugin, execution.id = %execution_id, "output after its execution ended");
            }
        }
        Ok(())
    }
}

/// An `environmentExecuteOutput` notification exactly as the general path reads it, but straight from its line:
/// no generic [`Value`] in between, and the id and the data copied once, out of the line. `None` for any line that
/// is not one — another message, or one with a field more or less, the wrong `jsonrpc`, the wrong shape — which the
/// general path then judges, errors included.
fn output_notification(line: &[u8]) -> Option<(String, OutputChunk)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line<'a> {
        #[serde(borrow)]
        jsonrpc: Cow<'a, str>,
        #[serde(borrow)]
        method: Cow<'a, str>,
        #[serde(borrow)]
        params: Params<'a>,
    }
    /// As lenient as [`OutputNotification`]: fields it does not know are skipped.
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Params<'a> {
        #[serde(borrow)]
        execution_id: Cow<'a, str>,
        stream: wire::Stream,
        offset: u64,
        /// Base64, which has nothing to escape: borrowed from the line as raw bytes, for which serde only looks
        /// for the closing quote (a SIMD search) instead of checking each byte of the string as it goes. What a
        /// string must be in JSON is checked below, in two fast passes.
        #[serde(borrow)]
        data: Cow<'a, [u8]>,
    }
    let message: Line<'_> = serde_json::from_slice(line).ok()?;
    if message.jsonrpc != "2.0" || message.method != wire::EXECUTE_OUTPUT {
        return None;
    }
    let Params {
        execution_id,
        stream,
        offset,
        data,
    } = message.params;
    // Raw, the string could hold what JSON forbids in one (control characters, bytes that are not UTF-8): such a
    // line, and one with escapes in its data, is left to the general path.
    let Cow::Borrowed(data) = data else {
        return None;
    };
    // Decoded straight from the line. Decoding checks every byte against the base64 alphabet, which is printable
    // ASCII: data that decodes held no control character and no byte that is not UTF-8, so it was a valid JSON
    // string as well; anything else goes to the general path.
    let data = decode_output(data).ok()?;
    Some((
        execution_id.into_owned(),
        OutputChunk {
            stream,
            offset,
            data,
        },
    ))
}

/// Output data from base64: the hot path of plugin output, so SIMD base64, as strict as the `base64` crate
/// (padding, trailing bits).
fn decode_output(data: &[u8]) -> Result<Vec<u8>, base64_simd::Error> {
    base64_simd::STANDARD.decode_to_vec(data)
}

fn encode(message: &impl Serialize) -> Result<Vec<u8>, String> {
    let mut line =
        serde_json::to_vec(message).map_err(|error| format!("encoding a message: {error}"))?;
    line.push(b'\n');
    Ok(line)
}

async fn write_loop(
    mut stdin: impl AsyncWrite + Unpin,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    closed: CancellationToken,
) {
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            () = closed.cancelled() => None,
        };
        let Some(line) = line else { break };
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            closed.cancel();
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_decoding_is_as_strict_as_the_base64_crate() {
        use base64::Engine as _;
        for text in [
            "aGk=", "aGVsbG8=", "", "AAAA", "QQ", "QR==", "aGk", "a===", "aG k=", "aGk=\n", "****",
        ] {
            let simd = decode_output(text.as_bytes()).ok();
            let scalar = base64::engine::general_purpose::STANDARD.decode(text).ok();
            assert_eq!(simd, scalar, "{text:?}");
        }
    }
    use tokio::io::{AsyncBufReadExt, duplex};

    /// A scripted plugin on the other end of an in-memory pipe.
    async fn pair() -> (
        Connection,
        BufReader<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
    ) {
        let (host_out, plugin_in) = duplex(1 << 20);
        let (plugin_out, host_in) = duplex(1 << 20);
        let connection = Connection::start("demo", host_in, host_out);
        (connection, BufReader::new(plugin_in), plugin_out)
    }

    #[tokio::test]
    async fn answers_find_their_calls_even_out_of_order() {
        let (connection, mut requests, mut answers) = pair().await;
        let first = connection.clone();
        let second = connection.clone();
        let a = tokio::spawn(async move {
            first
                .call::<_, Value>("health", &serde_json::json!({}), Duration::from_secs(5))
                .await
        });
        let b = tokio::spawn(async move {
            second
                .call::<_, Value>("health", &serde_json::json!({}), Duration::from_secs(5))
                .await
        });
        let mut ids = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            requests.read_line(&mut line).await.unwrap();
            let request: Value = serde_json::from_str(&line).unwrap();
            ids.push(request["id"].as_u64().unwrap());
        }
        for id in ids.iter().rev() {
            let line = format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"n\":{id}}}}}\n");
            answers.write_all(line.as_bytes()).await.unwrap();
        }
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_ne!(a, b);
        assert!(ids.contains(&a["n"].as_u64().unwrap()));
        assert!(ids.contains(&b["n"].as_u64().unwrap()));
    }

    #[tokio::test]
    async fn notifications_follow_the_call_they_belong_to() {
        let (connection, mut requests, _answers) = pair().await;
        let caller = connection.clone();
        let _call = tokio::spawn(async move {
            caller
                .call::<_, Value>(
                    "environmentExecute",
                    &serde_json::json!({}),
                    Duration::from_secs(5),
                )
                .await
        });
        tokio::task::yield_now().await;
        connection
            .notify(
                wire::EXECUTE_INPUT,
                &serde_json::json!({"executionId": "x", "data": "", "eof": true}),
            )
            .await
            .unwrap();
        let mut call = String::new();
        requests.read_line(&mut call).await.unwrap();
        let call: Value = serde_json::from_str(&call).unwrap();
        assert_eq!(call["method"], "environmentExecute");
        let mut notification = String::new();
        requests.read_line(&mut notification).await.unwrap();
        let notification: Value = serde_json::from_str(&notification).unwrap();
        assert_eq!(notification["method"], wire::EXECUTE_INPUT);
        assert!(notification.get("id").is_none(), "{notification}");

        connection.close();
        let error = connection
            .notify(wire::EXECUTE_INPUT, &serde_json::json!({}))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "plugin_exited", "{error}");
    }

    /// What the general path makes of a line that is an output notification.
    fn general(line: &str) -> Option<OutputNotification> {
        let message: Incoming = serde_json::from_str(line).ok()?;
        if message.jsonrpc != "2.0"
            || message.id.is_some()
            || message.method.as_deref() != Some(wire::EXECUTE_OUTPUT)
        {
            return None;
        }
        serde_json::from_value(message.params.unwrap_or(Value::Null)).ok()
    }

    #[test]
    fn output_lines_read_directly_are_read_as_the_general_path_reads_them() {
        let head = r#"{"jsonrpc":"2.0","method":"environmentExecuteOutput","params":"#;
        let read = [
            r#"{"executionId":"e-1","stream":"stdout","offset":0,"data":"aGVsbG8="}"#,
            // Escapes in the id and the data, unicode, another order, a field the host does not know.
            r#"{"data":"aGVsbG8=","offset":18446744073709551615,"stream":"stderr","executionId":"q\"\\\u00fc ✓ 𝄞","x":[1]}"#,
            r#"{"executionId":"","stream":"stdout","offset":3,"data":""}"#,
        ];
        for params in read {
            let line = format!("{head}{params}}}");
            let (id, direct) = output_notification(line.as_bytes()).expect(&line);
            let general = general(&line).unwrap();
            assert_eq!(id, general.execution_id);
            assert_eq!(direct.stream, general.stream);
            assert_eq!(direct.offset, general.offset);
            assert_eq!(direct.data, decode_output(general.data.as_bytes()).unwrap());
        }
        let direct = output_notification(
            br#"  {"params":{"executionId":"q\"\u00fc","stream":"stdout","offset":1,"data":"eA=="},"method":"environmentExecuteOutput","jsonrpc":"2.0"} "#,
        )
        .unwrap();
        assert_eq!(direct.0, "q\"ü");
        assert_eq!(direct.1.data, b"x");

        // Anything else is left to the general path, which answers for it (an error, a response, another method).
        let left = [
            format!("{head}{}}}", r#"{"executionId":"e","stream":"stdin","offset":0,"data":""}"#),
            format!("{head}{}}}", r#"{"executionId":"e","stream":"stdout","offset":-1,"data":""}"#),
            format!("{head}{}}}", r#"{"executionId":"e","stream":"stdout","data":""}"#),
            format!("{head}null}}"),
            // Data that is not plain text: escaped (the general path unescapes it), or what JSON forbids in a string.
            format!("{head}{}}}", r#"{"executionId":"e","stream":"stdout","offset":0,"data":"aGVs\/bG8="}"#),
            format!("{head}{}}}", "{\"executionId\":\"e\",\"stream\":\"stdout\",\"offset\":0,\"data\":\"aG\tk=\"}"),
            format!("{head}{}}} x", r#"{"executionId":"e","stream":"stdout","offset":0,"data":""}"#),
            r#"{"jsonrpc":"2.0","id":1,"method":"environmentExecuteOutput","params":{"executionId":"e","stream":"stdout","offset":0,"data":""}}"#.to_owned(),
            r#"{"jsonrpc":"1.0","method":"environmentExecuteOutput","params":{"executionId":"e","stream":"stdout","offset":0,"data":""}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"somethingElse","params":{"executionId":"e","stream":"stdout","offset":0,"data":""}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#.to_owned(),
            "hello, I am not JSON".to_owned(),
        ];
        for line in left {
            assert!(output_notification(line.as_bytes()).is_none(), "{line}");
            if let Some(general) = general(&line) {
                // Only data the general path would unescape is read there.
                assert_eq!(general.data, "aGVs/bG8=", "{line}");
            }
        }
        let mut not_utf8 = format!(
            "{head}{}}}",
            r#"{"executionId":"e","stream":"stdout","offset":0,"data":"aGk="}"#
        )
        .into_bytes();
        let at = not_utf8.len() - 4;
        not_utf8[at] = 0xff;
        assert!(output_notification(&not_utf8).is_none());
        assert!(serde_json::from_slice::<Incoming>(&not_utf8).is_err());
    }

    #[tokio::test]
    async fn output_reaches_its_subscriber_and_a_malformed_chunk_is_a_protocol_error() {
        let (connection, _requests, mut answers) = pair().await;
        let mut output = connection.subscribe_output("q\"ü");
        answers
            .write_all(
                concat!(
                    r#"{"jsonrpc":"2.0","method":"environmentExecuteOutput","params":{"executionId":"q\"\u00fc","stream":"stdout","offset":0,"data":"aGk="}}"#,
                    "\n",
                    r#"{"jsonrpc":"2.0","method":"environmentExecuteOutput","params":{"executionId":"q\"\u00fc","stream":"stdin","offset":2,"data":""}}"#,
                    "\n",
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let chunk = output.recv().await.unwrap();
        assert_eq!(
            (chunk.stream, chunk.offset, chunk.data.as_slice()),
            (wire::Stream::Stdout, 0, b"hi".as_slice())
        );
        connection.closed().await;
        let error = connection.protocol_error().unwrap();
        assert!(error.contains("has the wrong shape"), "{error}");
        assert!(output.recv().await.is_none());
    }

    #[tokio::test]
    async fn garbage_closes_the_connection_and_fails_calls_in_flight() {
        let (connection, _requests, mut answers) = pair().await;
        let caller = connection.clone();
        let call = tokio::spawn(async move {
            caller
                .call::<_, Value>("health", &serde_json::json!({}), Duration::from_secs(30))
                .await
        });
        answers.write_all(b"hello, I am not JSON\n").await.unwrap();
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(error.code(), "plugin_protocol_error", "{error}");
        assert!(error.to_string().contains("not JSON-RPC"), "{error}");
        connection.closed().await;
    }

    #[tokio::test]
    async fn an_oversized_line_is_a_protocol_error() {
        let (connection, _requests, mut answers) = pair().await;
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..17 {
                if answers.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        connection.closed().await;
        assert!(
            connection
                .protocol_error()
                .unwrap()
                .contains("longer than 16 MiB")
        );
        writer.abort();
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_fails_and_its_late_answer_is_dropped() {
        let (connection, mut requests, mut answers) = pair().await;
        let error = connection
            .call::<_, Value>("health", &serde_json::json!({}), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "plugin_deadline_exceeded");
        let mut line = String::new();
        requests.read_line(&mut line).await.unwrap();
        answers
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n")
            .await
            .unwrap();
        // The connection is still good for the next call.
        let next = connection.clone();
        let call = tokio::spawn(async move {
            next.call::<_, Value>("health", &serde_json::json!({}), Duration::from_secs(5))
                .await
        });
        line.clear();
        requests.read_line(&mut line).await.unwrap();
        answers
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"status\":\"ok\"}}\n")
            .await
            .unwrap();
        assert_eq!(call.await.unwrap().unwrap()["status"], "ok");
    }
}
