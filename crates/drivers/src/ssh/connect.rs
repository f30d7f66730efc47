//! Opening an authenticated SSH connection: TCP within a deadline, the host key checked against the pinned
//! `knownHosts`, then the key or password the server decrypted for this call. Also the client handler, which routes
//! forwarded channels (the callback bridge) to whoever asked for the remote port.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::Channel;
use russh::client::{self, AuthResult, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use secrecy::ExposeSecret;
use tokio::sync::mpsc;

use super::target::SshTarget;

/// How long to wait for TCP and the SSH handshake before calling the host unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives find a dead peer (a pulled cable, a killed sshd) within about `interval × max`.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 3;

/// What the host-key check saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKeyVerdict {
    /// The presented key is pinned in `knownHosts`.
    Pinned,
    /// Not pinned, and strict checking is off.
    AcceptedUnpinned,
    /// Not pinned, strict checking on: refused.
    Unknown,
    /// `knownHosts` pins another key for this host: refused.
    Changed,
}

/// Remote port → where that port's forwarded connections go.
pub type ForwardRoutes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Channel<Msg>>>>>;

/// The client half of a connection: checks the host key, and hands forwarded channels to their route.
#[derive(Debug)]
pub struct ClientHandler {
    pinned: Vec<PublicKey>,
    host_is_listed: bool,
    strict: bool,
    seen: Arc<Mutex<Option<(HostKeyVerdict, String)>>>,
    routes: ForwardRoutes,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        presented: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = presented else {
            self.record(
                HostKeyVerdict::Unknown,
                "an SSH certificate (not supported for pinning)".to_owned(),
            );
            return Ok(false);
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let verdict = if self
            .pinned
            .iter()
            .any(|pinned| pinned.key_data() == key.key_data())
        {
            HostKeyVerdict::Pinned
        } else if self.host_is_listed {
            HostKeyVerdict::Changed
        } else if self.strict {
            HostKeyVerdict::Unknown
        } else {
            HostKeyVerdict::AcceptedUnpinned
        };
        let accept = matches!(
            verdict,
            HostKeyVerdict::Pinned | HostKeyVerdict::AcceptedUnpinned
        );
        self.record(verdict, fingerprint);
        Ok(accept)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let route = self
            .routes
            .lock()
            .ok()
            .and_then(|routes| routes.get(&connected_port).cloned());
        match route {
            Some(route) => {
                reply.accept().await;
                if route.send(channel).is_err() {
                    tracing::debug!(
                        port = connected_port,
                        "forwarded connection after its tunnel closed"
                    );
                }
            }
            // Dropping the reply rejects the channel: nobody asked for this port (or no longer).
            None => tracing::debug!(
                port = connected_port,
                "rejecting a forwarded connection to an unknown port"
            ),
        }
        Ok(())
    }
}

impl ClientHandler {
    fn record(&self, verdict: HostKeyVerdict, fingerprint: String) {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((verdict, fingerprint));
        }
    }
}

/// An authenticated connection, and what its host-key check saw.
pub struct Connected {
    pub handle: client::Handle<ClientHandler>,
    pub routes: ForwardRoutes,
    pub verdict: Option<(HostKeyVerdict, String)>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("verdict", &self.verdict)
            .finish_non_exhaustive()
    }
}

/// Why a connection could not be made; every message names the target and holds no secret.
#[derive(Debug)]
pub enum ConnectError {
    Unreachable(String),
    HostKey(String),
    Auth(String),
}

impl ConnectError {
    pub fn message(&self) -> &str {
        match self {
            ConnectError::Unreachable(message)
            | ConnectError::HostKey(message)
            | ConnectError::Auth(message) => message,
        }
    }
}

/// Connects, checks the host key and authenticates.
pub async fn connect(config: &SshTarget) -> Result<Connected, ConnectError> {
    let target = config.display();
    let (pinned, host_is_listed) = pinned_keys(&config.known_hosts, &config.host, config.port);
    let seen = Arc::new(Mutex::new(None));
    let routes = ForwardRoutes::default();
    let handler = ClientHandler {
        pinned,
        host_is_listed,
        strict: config.strict,
        seen: seen.clone(),
        routes: routes.clone(),
    };
    let client_config = Arc::new(client::Config {
        // Pooled connections idle between runs; keep-alives, not an inactivity timer, decide they are dead.
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    });
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client::connect(client_config, (config.host.as_str(), config.port), handler),
    )
    .await;
    let verdict = seen.lock().ok().and_then(|seen| seen.clone());
    let mut handle = match connected {
        Err(_) => {
            return Err(ConnectError::Unreachable(format!(
                "{target} did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(error)) => {
            return Err(match verdict {
                Some((HostKeyVerdict::Changed, fingerprint)) => ConnectError::HostKey(format!(
                    "host key mismatch for {target}: it presented {fingerprint}, which is not the key pinned in knownHosts; refused"
                )),
                Some((HostKeyVerdict::Unknown, fingerprint)) => ConnectError::HostKey(format!(
                    "unknown host key for {target}: it presented {fingerprint}; pin it in knownHosts (or turn off strictHostKeyChecking)"
                )),
                _ => ConnectError::Unreachable(format!("cannot connect to {target}: {error}")),
            });
        }
        Ok(Ok(handle)) => handle,
    };
    let authenticated = tokio::time::timeout(CONNECT_TIMEOUT, authenticate(&mut handle, config))
        .await
        .unwrap_or_else(|_| Err("the server did not answer in time".to_owned()));
    if let Err(message) = authenticated {
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        return Err(ConnectError::Auth(format!(
            "authentication refused for {target}: {message}"
        )));
    }
    Ok(Connected {
        handle,
        routes,
        verdict,
    })
}

async fn authenticate(
    session: &mut client::Handle<ClientHandler>,
    config: &SshTarget,
) -> Result<(), String> {
    let mut tried = false;
    if let Some(pem) = &config.private_key {
        tried = true;
        // An encrypted key opens with the password as its passphrase.
        let key = russh::keys::decode_secret_key(pem.expose_secret(), None)
            .or_else(|error| match &config.password {
                Some(passphrase) => {
                    russh::keys::decode_secret_key(pem.expose_secret(), Some(passphrase.expose_secret()))
                }
                None => Err(error),
            })
            .map_err(|_| {
                "the private key cannot be read (an OpenSSH or PEM key; an encrypted one needs its passphrase as the password)"
                    .to_owned()
            })?;
        let hash = session
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let result = session
            .authenticate_publickey(
                &config.username,
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|error| error.to_string())?;
        if matches!(result, AuthResult::Success) {
            return Ok(());
        }
    }
    if let Some(password) = &config.password {
        tried = true;
        let result = session
            .authenticate_password(&config.username, password.expose_secret())
            .await
            .map_err(|error| error.to_string())?;
        if matches!(result, AuthResult::Success) {
            return Ok(());
        }
    }
    Err(if tried {
        "the server did not accept the credentials".to_owned()
    } else {
        "the config has no key or password".to_owned()
    })
}

/// The keys `known_hosts` text pins for `host:port`, and whether the host is listed at all. Entries name hosts as
/// `host` (port 22) or `[host]:port`, comma-separated; hashed entries (`|1|…`) and markers are not supported and are
/// skipped.
pub fn pinned_keys(known_hosts: &str, host: &str, port: u16) -> (Vec<PublicKey>, bool) {
    let wanted = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut keys = Vec::new();
    let mut listed = false;
    for line in known_hosts
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_algorithm), Some(encoded)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !hosts.split(',').any(|entry| entry == wanted) {
            continue;
        }
        listed = true;
        if let Ok(key) = russh::keys::parse_public_key_base64(encoded) {
            keys.push(key);
        }
    }
    (keys, listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_entries_match_host_and_port() {
        let key = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let text = format!(
            "# comment\n[127.0.0.1]:2222 ssh-ed25519 {key}\nexample.com,other ssh-ed25519 {key}\n"
        );
        let (keys, listed) = pinned_keys(&text, "127.0.0.1", 2222);
        assert!(listed);
        assert_eq!(keys.len(), 1);
        assert!(pinned_keys(&text, "127.0.0.1", 22).0.is_empty());
        assert!(pinned_keys(&text, "example.com", 22).1);
        assert!(!pinned_keys(&text, "nowhere", 22).1);
    }
}
