//! A shell on a remote that berth reaches by running scripts: an SSH host, or a sandbox through its provider's
//! execute. [`crate::remote_workspace`] syncs workspaces through any of them the same way.

use std::time::Duration;

use berth_core::driver::{BoxFuture, DriverError};
use tokio::sync::mpsc;

/// How long short control commands (mkdir, kill, rm, listings) may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs berth-written POSIX shell scripts on a remote. Scripts hold no secret: they may be visible in `/proc` there.
pub trait RemoteShell: Send + Sync {
    /// Runs `script` with `input`'s chunks as its stdin, its stdout handed to `output` chunk by chunk (backpressure)
    /// or else collected, within `limit`. A stopped `output` ends the read early: its side reports why.
    fn run_script<'a>(
        &'a self,
        script: &'a str,
        input: mpsc::Receiver<Vec<u8>>,
        output: Option<mpsc::Sender<Vec<u8>>>,
        limit: Duration,
    ) -> BoxFuture<'a, Result<ScriptOutput, DriverError>>;
}

/// What a script printed and how it exited.
#[derive(Debug)]
pub struct ScriptOutput {
    pub status: Option<u32>,
    /// Empty when stdout went to a channel.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ScriptOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The first line of stderr, for error messages.
    pub fn error_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .lines()
            .next()
            .unwrap_or("no message")
            .to_owned()
    }
}

/// Runs a short script, feeding it `stdin`, and collects its output.
pub async fn control(
    shell: &dyn RemoteShell,
    script: &str,
    stdin: Option<Vec<u8>>,
) -> Result<ScriptOutput, DriverError> {
    let (input, received) = mpsc::channel(1);
    if let Some(stdin) = stdin {
        // The channel is empty and holds one: this cannot fail.
        let _ = input.try_send(stdin);
    }
    drop(input);
    shell
        .run_script(script, received, None, CONTROL_TIMEOUT)
        .await
}

/// Single-quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("/srv/it's here"), r"'/srv/it'\''s here'");
    }
}
