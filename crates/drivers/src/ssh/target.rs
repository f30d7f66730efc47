//! Where an SSH connection goes and as whom: the host, the user, the pinned host keys and the decrypted credential.
//!
//! Its own module because connecting (`connect`), pooling (`pool`) and every remote operation name it, and the pool
//! depends on connecting: kept in either, the other would have to import it back.

use std::fmt;

use berth_core::config::{SecretSlot, SshConfig};
use secrecy::{ExposeSecret, SecretString};

/// Everything needed to reach a host as a user, with the credential decrypted. Its `Debug` never shows secrets.
#[derive(Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub known_hosts: String,
    pub strict: bool,
    pub private_key: Option<SecretString>,
    pub password: Option<SecretString>,
}

impl fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshTarget")
            .field("target", &self.display())
            .field("strict", &self.strict)
            .field("private_key", &self.private_key.is_some())
            .field("password", &self.password.is_some())
            .finish_non_exhaustive()
    }
}

impl SshTarget {
    /// The target of a config whose secrets the server resolved. A secret still stored (unresolved) is left out, so
    /// authentication fails with "no key or password" rather than with a confusing error.
    pub fn from_config(config: &SshConfig) -> Self {
        let inline = |slot: &Option<SecretSlot>| match slot {
            Some(SecretSlot::Inline(secret)) => {
                Some(SecretString::from(secret.expose_secret().to_owned()))
            }
            _ => None,
        };
        Self {
            host: config.host.clone(),
            port: config.port,
            username: config.username.clone(),
            known_hosts: config.known_hosts.clone().unwrap_or_default(),
            strict: config.strict_host_key_checking,
            private_key: inline(&config.private_key),
            password: inline(&config.password),
        }
    }

    /// `user@host:port`, for messages and logs.
    pub fn display(&self) -> String {
        format!("{}@{}:{}", self.username, self.host, self.port)
    }
}
