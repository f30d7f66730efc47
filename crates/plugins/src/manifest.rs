//! `berth-plugin.json`: what a plugin is, how to start it, and which drivers it offers (PLUGINS.md §1).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::PluginError;

/// The manifest's file name inside a plugin directory.
pub const MANIFEST_FILE: &str = "berth-plugin.json";

/// A manifest larger than this is not a manifest.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// A parsed and checked manifest, with the directory it came from.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub id: String,
    pub version: String,
    /// The program and its arguments; a relative program is resolved against [`Manifest::dir`].
    pub command: Vec<String>,
    /// Names of the server's environment variables the plugin receives.
    pub env: Vec<String>,
    pub drivers: Vec<DriverEntry>,
    /// The plugin directory (canonical): the command's working directory.
    pub dir: PathBuf,
}

/// What a driver of a plugin backs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// `driver: "sandbox"` environments whose `provider` is the driver key.
    SandboxProvider,
    /// `driver: "plugin"` environments naming this plugin and driver key.
    EnvironmentDriver,
}

/// One entry of `environmentDrivers`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriverEntry {
    pub driver_key: String,
    pub kind: DriverKind,
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub supports_reusable_leases: bool,
    pub config_schema: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawManifest {
    id: String,
    version: String,
    command: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    environment_drivers: Vec<DriverEntry>,
}

impl Manifest {
    /// Reads and checks `<dir>/berth-plugin.json`.
    pub fn load(dir: &Path) -> Result<Self, PluginError> {
        let invalid = |message: String| PluginError::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            message,
        };
        let dir = std::fs::canonicalize(dir).map_err(|error| invalid(error.to_string()))?;
        let path = dir.join(MANIFEST_FILE);
        let size = std::fs::metadata(&path)
            .map_err(|error| invalid(error.to_string()))?
            .len();
        if size > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "{size} bytes: a manifest holds at most {MAX_MANIFEST_BYTES}"
            )));
        }
        let text = std::fs::read(&path).map_err(|error| invalid(error.to_string()))?;
        let raw: RawManifest =
            serde_json::from_slice(&text).map_err(|error| invalid(error.to_string()))?;
        Self::check(raw, dir).map_err(invalid)
    }

    fn check(raw: RawManifest, dir: PathBuf) -> Result<Self, String> {
        if !is_plugin_id(&raw.id) {
            return Err(format!(
                "id {:?} must match ^[a-z0-9][a-z0-9._-]{{0,63}}$",
                raw.id
            ));
        }
        if raw.version.trim().is_empty() {
            return Err("version must not be empty".to_owned());
        }
        match raw.command.first() {
            None => return Err("command must name a program".to_owned()),
            Some(program) if program.is_empty() => {
                return Err("command must name a program".to_owned());
            }
            Some(_) => {}
        }
        if raw.command.iter().any(|argument| argument.contains('\0')) {
            return Err("command must not contain NUL".to_owned());
        }
        for name in &raw.env {
            if !is_env_name(name) || name.starts_with("BERTH_") {
                return Err(format!(
                    "env: {name:?} is not a variable a plugin may receive (a name like ACME_API_URL, not BERTH_*)"
                ));
            }
        }
        if raw.environment_drivers.is_empty() {
            return Err("environmentDrivers must list at least one driver".to_owned());
        }
        let mut keys = std::collections::BTreeSet::new();
        for driver in &raw.environment_drivers {
            if !is_driver_key(&driver.driver_key) {
                return Err(format!(
                    "driverKey {:?} must match ^[a-z0-9][a-z0-9_-]{{0,63}}$",
                    driver.driver_key
                ));
            }
            if !keys.insert(driver.driver_key.as_str()) {
                return Err(format!("driverKey {:?} is listed twice", driver.driver_key));
            }
            if !driver.config_schema.is_object() {
                return Err(format!(
                    "driver {:?}: configSchema must be a JSON object",
                    driver.driver_key
                ));
            }
        }
        Ok(Self {
            id: raw.id,
            version: raw.version,
            command: raw.command,
            env: raw.env,
            drivers: raw.environment_drivers,
            dir,
        })
    }

    /// The program to execute: relative paths are relative to the plugin directory; a bare name is looked up on the
    /// plugin's `PATH` when it is spawned.
    pub fn program(&self) -> PathBuf {
        let program = Path::new(&self.command[0]);
        if program.is_absolute() || !self.command[0].contains('/') {
            program.to_owned()
        } else {
            self.dir.join(program)
        }
    }
}

/// Every plugin directory under `roots` (directories holding plugin directories, like `<data-dir>/plugins`) and the
/// plugin directories named one by one in `dirs`, in a stable order.
pub fn plugin_dirs(roots: &[PathBuf], dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut children: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.join(MANIFEST_FILE).exists())
            .collect();
        children.sort();
        found.extend(children);
    }
    found.extend(dirs.iter().cloned());
    found
}

pub(crate) fn is_plugin_id(id: &str) -> bool {
    key_matches(id, |c| matches!(c, '.' | '_' | '-'))
}

pub(crate) fn is_driver_key(key: &str) -> bool {
    key_matches(key, |c| matches!(c, '_' | '-'))
}

fn key_matches(key: &str, punctuation: impl Fn(char) -> bool) -> bool {
    let mut chars = key.chars();
    key.len() <= 64
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || punctuation(c))
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, manifest: &Value) {
        std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
    }

    fn example() -> Value {
        serde_json::json!({
            "id": "acme.sandbox",
            "version": "1.4.0",
            "command": ["bin/acme-provider", "--stdio"],
            "env": ["ACME_API_URL"],
            "environmentDrivers": [{
                "driverKey": "acme",
                "kind": "sandbox_provider",
                "displayName": "Acme sandboxes",
                "description": "Firecracker VMs from Acme",
                "supportsReusableLeases": true,
                "configSchema": {"type": "object", "properties": {"apiKey": {"type": "string", "format": "secret-ref"}}}
            }]
        })
    }

    #[test]
    fn the_spec_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &example());
        let manifest = Manifest::load(dir.path()).unwrap();
        assert_eq!(manifest.id, "acme.sandbox");
        assert_eq!(manifest.drivers[0].kind, DriverKind::SandboxProvider);
        assert!(manifest.drivers[0].supports_reusable_leases);
        assert_eq!(
            manifest.program(),
            std::fs::canonicalize(dir.path())
                .unwrap()
                .join("bin/acme-provider")
        );
    }

    #[test]
    fn broken_manifests_say_what_is_wrong() {
        let cases: [(&str, Value, &str); 6] = [
            (
                "id",
                serde_json::json!("Acme Sandbox"),
                "id \"Acme Sandbox\" must match",
            ),
            (
                "command",
                serde_json::json!([]),
                "command must name a program",
            ),
            (
                "env",
                serde_json::json!(["BERTH_ADMIN_TOKEN"]),
                "not a variable a plugin may receive",
            ),
            (
                "environmentDrivers",
                serde_json::json!([]),
                "at least one driver",
            ),
            (
                "unknownField",
                serde_json::json!(1),
                "unknown field `unknownField`",
            ),
            (
                "environmentDrivers",
                serde_json::json!([{"driverKey": "a.b", "kind": "sandbox_provider", "displayName": "x", "configSchema": {}}]),
                "driverKey \"a.b\" must match",
            ),
        ];
        for (field, value, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut manifest = example();
            manifest[field] = value;
            write(dir.path(), &manifest);
            let error = Manifest::load(dir.path()).unwrap_err().to_string();
            assert!(error.contains(expected), "{field}: {error}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_FILE), "{not json").unwrap();
        let error = Manifest::load(dir.path()).unwrap_err();
        assert_eq!(error.code(), "plugin_manifest_invalid");
    }

    #[test]
    fn discovery_lists_plugin_directories_in_order() {
        let root = tempfile::tempdir().unwrap();
        for name in ["b", "a", "not-a-plugin"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        write(&root.path().join("a"), &example());
        write(&root.path().join("b"), &example());
        let extra = PathBuf::from("/somewhere/else");
        let dirs = plugin_dirs(&[root.path().to_owned()], std::slice::from_ref(&extra));
        assert_eq!(dirs, [root.path().join("a"), root.path().join("b"), extra]);
    }
}
