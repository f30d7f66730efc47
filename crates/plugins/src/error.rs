//! The plugin host's errors.

use std::path::PathBuf;
use std::time::Duration;

use berth_core::ErrorKind;
use berth_core::driver::DriverError;

/// Why a plugin could not be loaded, started or asked something.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin manifest {}: {message}", .path.display())]
    InvalidManifest { path: PathBuf, message: String },

    /// The plugin is not ready: starting, restarting, or failed. Operations fail fast with the reason.
    #[error("plugin `{plugin}` is unavailable: {reason}")]
    Unavailable { plugin: String, reason: String },

    /// The call did not answer within its deadline.
    #[error("plugin `{plugin}` did not answer {method} within {}", seconds(*.deadline))]
    Deadline {
        plugin: String,
        method: &'static str,
        deadline: Duration,
    },

    /// The plugin does not implement a method the operation needs.
    #[error("plugin `{plugin}` does not support {method}")]
    UnsupportedMethod {
        plugin: String,
        method: &'static str,
    },

    /// The plugin answered with a JSON-RPC error (its message, secrets masked by the caller).
    #[error("plugin `{plugin}`: {message}")]
    Remote {
        plugin: String,
        code: i64,
        message: String,
    },

    /// The plugin broke the protocol (a line that is not JSON-RPC, an answer of the wrong shape, a gap in output).
    #[error("plugin `{plugin}` broke the protocol: {message}")]
    Protocol { plugin: String, message: String },

    /// The plugin's process went away while the call was in flight.
    #[error("plugin `{plugin}` exited during {method}")]
    Exited {
        plugin: String,
        method: &'static str,
    },
}

impl PluginError {
    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            PluginError::InvalidManifest { .. } => "plugin_manifest_invalid",
            PluginError::Unavailable { .. } => "provider_unavailable",
            PluginError::Deadline { .. } => "plugin_deadline_exceeded",
            PluginError::UnsupportedMethod { .. } => "plugin_method_unsupported",
            PluginError::Remote { .. } => "plugin_error",
            PluginError::Protocol { .. } => "plugin_protocol_error",
            PluginError::Exited { .. } => "plugin_exited",
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            PluginError::InvalidManifest { .. } | PluginError::UnsupportedMethod { .. } => {
                ErrorKind::Validation
            }
            PluginError::Unavailable { .. }
            | PluginError::Deadline { .. }
            | PluginError::Remote { .. }
            | PluginError::Protocol { .. }
            | PluginError::Exited { .. } => ErrorKind::Unavailable,
        }
    }
}

impl From<PluginError> for DriverError {
    fn from(error: PluginError) -> Self {
        match error {
            PluginError::Unavailable { plugin, reason } => DriverError::ProviderUnavailable {
                provider: plugin,
                reason,
            },
            other => DriverError::failed(other.to_string()),
        }
    }
}

/// A deadline for people: whole seconds as `30 s`, anything finer as `1.5 s` or `0.25 s`.
fn seconds(deadline: Duration) -> String {
    let millis = deadline.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{} s", millis / 1000)
    } else {
        format!("{} s", deadline.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_read_as_seconds_without_rounding_to_zero() {
        assert_eq!(seconds(Duration::from_secs(30)), "30 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(seconds(Duration::from_millis(250)), "0.25 s");
    }
}
