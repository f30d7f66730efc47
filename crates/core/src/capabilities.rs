//! What this berth can do: which drivers work, and which sandbox providers are installed.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::environment::Driver;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupportStatus {
    Supported,
    Unsupported,
}

impl SupportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SupportStatus::Supported => "supported",
            SupportStatus::Unsupported => "unsupported",
        }
    }
}

/// What one driver supports in this build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverCapability {
    pub status: SupportStatus,
    pub supports_saved_probe: bool,
    pub supports_unsaved_probe: bool,
    pub supports_run_execution: bool,
    /// Why the driver is unsupported, or a caveat, for people reading the capabilities.
    pub note: Option<&'static str>,
}

/// Where a sandbox provider comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderSource {
    Builtin,
    Plugin,
}

impl ProviderSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderSource::Builtin => "builtin",
            ProviderSource::Plugin => "plugin",
        }
    }
}

/// Whether an installed provider can serve leases now (API.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderStatus {
    Ready,
    Starting,
    /// It cannot serve leases on this host or right now; the reason says why and how to fix it.
    Unavailable,
    Failed,
}

impl ProviderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderStatus::Ready => "ready",
            ProviderStatus::Starting => "starting",
            ProviderStatus::Unavailable => "unavailable",
            ProviderStatus::Failed => "failed",
        }
    }
}

/// One installed sandbox provider.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxProviderCapability {
    pub status: ProviderStatus,
    /// Why the provider is not ready.
    pub reason: Option<String>,
    pub display_name: String,
    pub description: String,
    pub source: ProviderSource,
    /// The plugin that provides it (`source: plugin`).
    pub plugin_key: Option<String>,
    pub supports_reusable_leases: bool,
    pub supports_run_execution: bool,
    pub config_schema: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    pub drivers: BTreeMap<Driver, DriverCapability>,
    pub sandbox_providers: BTreeMap<String, SandboxProviderCapability>,
    /// Plugins' environment drivers (`driver: "plugin"`), by driver key, described like providers.
    pub plugin_drivers: BTreeMap<String, SandboxProviderCapability>,
    /// Plugins that could not be loaded, and why.
    pub plugin_problems: Vec<String>,
}
