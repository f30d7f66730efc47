//! Per-driver environment configs: parsing with strict validation, the stored shape, and PATCH merging.
//!
//! A config arrives as JSON. [`DriverConfig::parse`] checks it against its driver's rules, reports every problem with
//! its path (`config.port`), applies defaults, and yields a typed config. [`DriverConfig::to_stored`] renders the
//! shape that is persisted and returned: secrets appear there only as references (`privateKeySecretRef`), never as
//! values. Secrets given inline (`privateKey`, `password`) must be stored by the caller and bound with
//! [`DriverConfig::bind_secret`] before the config can be persisted.

use std::fmt;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::catalog::{
    ProviderCatalog, SECRET_REF_KEY, is_secret_reference, is_valid_key, secret_reference,
};
use crate::company::{UnknownVariant, parse_variant};
use crate::environment::Driver;
use crate::ids::SecretId;
use crate::secret_paths::{SecretLocation, SecretPaths};
use crate::validation::{ObjectReader, ValidationErrors, join_path};

/// Where the config sits in a request body; every path reported starts here.
pub const CONFIG_PATH: &str = "config";

/// Longest accepted command timeout, a run's or an environment's (`timeoutMs`): one day.
pub const MAX_TIMEOUT_MS: i64 = 86_400_000;

/// Longest accepted sandbox timeout (also how long a kept sandbox lives): the same day.
pub const MAX_SANDBOX_TIMEOUT_MS: i64 = MAX_TIMEOUT_MS;

/// The berth-level key every driver's config accepts: the default timeout of a command run in the environment, for
/// runs that give none. It is berth's, never a provider's or plugin driver's: it sits beside `provider` (sandbox) or
/// `driverConfig` (plugin), outside the fields their schemas validate, so they never see it.
pub const TIMEOUT_MS_KEY: &str = "timeoutMs";

/// The sync-back bound (`syncBackMaxMb`, MiB) of an environment whose config names none.
pub const DEFAULT_SYNC_BACK_MAX_MB: u64 = 1024;

/// Largest accepted `syncBackMaxMb`: 1 TiB.
pub const MAX_SYNC_BACK_MAX_MB: i64 = 1_048_576;

/// The config key of the sync-back bound, as error messages name it.
pub const SYNC_BACK_MAX_MB_KEY: &str = "syncBackMaxMb";

/// A validated environment config.
#[derive(Debug)]
pub enum DriverConfig {
    Local(LocalConfig),
    Ssh(SshConfig),
    Sandbox(SandboxConfig),
    Plugin(PluginConfig),
}

/// A `local` config: only berth's own keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalConfig {
    /// The default command timeout (`timeoutMs`).
    pub timeout_ms: Option<u64>,
}

/// How an SSH environment lays out workspaces on the remote host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkspaceMode {
    /// A fresh directory under `remoteWorkspacePath` for every run.
    PerRun,
    /// One directory per environment, reused by every run.
    Persistent,
}

impl WorkspaceMode {
    pub const ALL: [WorkspaceMode; 2] = [WorkspaceMode::PerRun, WorkspaceMode::Persistent];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceMode::PerRun => "per_run",
            WorkspaceMode::Persistent => "persistent",
        }
    }
}

impl FromStr for WorkspaceMode {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, WorkspaceMode::as_str)
    }
}

/// A secret-bearing field: either a reference to a stored secret, or a value given inline that is yet to be stored.
pub enum SecretSlot {
    Stored(SecretId),
    Inline(SecretString),
}

impl fmt::Debug for SecretSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSlot::Stored(id) => f.debug_tuple("Stored").field(id).finish(),
            SecretSlot::Inline(_) => f.write_str("Inline([redacted])"),
        }
    }
}

/// The secret-bearing fields of configs. SSH's have a write-only value key and a stored reference key; a schema's
/// `"format": "secret-ref"` fields (PLUGINS.md §5) hold the value when given and `{"secretRef": "<id>"}` once stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SecretField {
    SshPrivateKey,
    SshPassword,
    /// A secret-ref field among a sandbox config's provider fields.
    ProviderField(SecretLocation),
    /// A secret-ref field in a plugin config's `driverConfig`.
    PluginDriverField(SecretLocation),
}

impl SecretField {
    /// The write-only key that carries an SSH secret's value in requests.
    fn value_key(&self) -> &'static str {
        match self {
            SecretField::SshPrivateKey => "privateKey",
            SecretField::SshPassword => "password",
            SecretField::ProviderField(_) | SecretField::PluginDriverField(_) => "",
        }
    }

    /// The key that carries an SSH secret's reference in the stored shape.
    fn ref_key(&self) -> &'static str {
        match self {
            SecretField::SshPrivateKey => "privateKeySecretRef",
            SecretField::SshPassword => "passwordSecretRef",
            SecretField::ProviderField(_) | SecretField::PluginDriverField(_) => "",
        }
    }

    /// Where the value is given, relative to the config: `privateKey`, `apiKey`, `driverConfig.auth.token`.
    pub fn value_path(&self) -> String {
        match self {
            SecretField::SshPrivateKey | SecretField::SshPassword => self.value_key().to_owned(),
            SecretField::ProviderField(location) => location.to_string(),
            SecretField::PluginDriverField(location) => format!("{DRIVER_CONFIG_KEY}.{location}"),
        }
    }

    /// Where the stored reference sits, relative to the config: `privateKeySecretRef`, `apiKey`.
    pub fn ref_path(&self) -> String {
        match self {
            SecretField::SshPrivateKey | SecretField::SshPassword => self.ref_key().to_owned(),
            SecretField::ProviderField(_) | SecretField::PluginDriverField(_) => self.value_path(),
        }
    }

    /// How to give a new value at this field, for error messages.
    pub fn how_to_replace(&self) -> String {
        match self {
            SecretField::SshPrivateKey | SecretField::SshPassword => {
                format!("give the value itself as `{}`", self.value_key())
            }
            SecretField::ProviderField(_) | SecretField::PluginDriverField(_) => format!(
                "give the value itself as `{}` instead of a {{\"{SECRET_REF_KEY}\"}} object",
                self.value_path()
            ),
        }
    }
}

/// The key of a plugin config's driver fields.
pub const DRIVER_CONFIG_KEY: &str = "driverConfig";

/// Write-only keys and the reference keys they replace, for every driver.
const WRITE_ONLY_KEYS: [SecretField; 2] = [SecretField::SshPrivateKey, SecretField::SshPassword];

#[derive(Debug)]
pub struct SshConfig {
    pub host: String,
    pub port: u16,
    pub username: String,
    /// Absolute path on the remote host under which workspaces live.
    pub remote_workspace_path: String,
    pub private_key: Option<SecretSlot>,
    pub password: Option<SecretSlot>,
    /// `known_hosts` lines that pin the host key.
    pub known_hosts: Option<String>,
    pub strict_host_key_checking: bool,
    pub workspace_mode: WorkspaceMode,
    /// Paths the workspace sync leaves alone, both ways (`syncExclude`).
    pub sync_exclude: SyncExclude,
    /// Most MiB of file content one sync-back may bring from the remote host (`syncBackMaxMb`); `None`: the default.
    pub sync_back_max_mb: Option<u64>,
    /// The default command timeout (`timeoutMs`).
    pub timeout_ms: Option<u64>,
}

impl SshConfig {
    /// The sync-back bound in MiB, default applied.
    pub fn sync_back_limit_mb(&self) -> u64 {
        self.sync_back_max_mb.unwrap_or(DEFAULT_SYNC_BACK_MAX_MB)
    }
}

/// Most patterns one `syncExclude` may hold, and the longest pattern.
const MAX_EXCLUDE_PATTERNS: usize = 100;
const MAX_EXCLUDE_PATTERN_LEN: usize = 256;

/// Workspace paths a sync neither sends nor brings back: `node_modules` and `*.log` (no `/`) match an entry of that
/// name anywhere; `build/cache` (with `/`) matches that path from the workspace root. `*` matches any run of
/// characters within one name and `?` one character. What a pattern matches, it matches with everything below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncExclude {
    patterns: Vec<String>,
}

impl SyncExclude {
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `path` (relative, `/`-separated) or one of its parents is excluded.
    pub fn matches(&self, path: &str) -> bool {
        let names: Vec<&str> = path.split('/').collect();
        self.patterns.iter().any(|pattern| {
            let parts: Vec<&str> = pattern.trim_matches('/').split('/').collect();
            if parts.len() == 1 {
                names.iter().any(|name| glob_name(parts[0], name))
            } else {
                parts.len() <= names.len()
                    && parts
                        .iter()
                        .zip(&names)
                        .all(|(part, name)| glob_name(part, name))
            }
        })
    }

    fn problem(pattern: &str) -> Option<&'static str> {
        let trimmed = pattern.trim_matches('/');
        if trimmed.is_empty() {
            Some("must not be empty")
        } else if pattern.len() > MAX_EXCLUDE_PATTERN_LEN {
            Some("is too long")
        } else if pattern.chars().any(char::is_control) {
            Some("must not contain control characters")
        } else if trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            Some("must be names separated by single '/', without '.' or '..'")
        } else {
            None
        }
    }
}

/// `*` and `?` matching of one path name.
fn glob_name(pattern: &str, name: &str) -> bool {
    fn matches(pattern: &[char], name: &[char]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some(('*', rest)) => (0..=name.len()).any(|skip| matches(rest, &name[skip..])),
            Some(('?', rest)) => !name.is_empty() && matches(rest, &name[1..]),
            Some((c, rest)) => name.first() == Some(c) && matches(rest, &name[1..]),
        }
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    matches(&pattern, &name)
}

/// A `sandbox` config. Its `Debug` prints no secret: what sits at a secret-ref field is redacted.
#[derive(Clone, PartialEq)]
pub struct SandboxConfig {
    pub provider: String,
    pub reuse_lease: bool,
    /// The default command timeout (`timeoutMs`), and how long a kept (`retained`) sandbox lives.
    pub timeout_ms: Option<u64>,
    /// Most MiB of file content one sync-back may bring from the sandbox (`syncBackMaxMb`); `None`: the default.
    pub sync_back_max_mb: Option<u64>,
    /// The provider's own fields, validated against its schema, defaults applied. A secret-ref field holds
    /// `{"secretRef": id}` when stored, and its value when given or resolved for use.
    pub fields: Map<String, Value>,
    /// Where the provider's schema keeps secrets.
    pub secrets: SecretPaths,
}

impl fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("provider", &self.provider)
            .field("reuse_lease", &self.reuse_lease)
            .field("timeout_ms", &self.timeout_ms)
            .field("sync_back_max_mb", &self.sync_back_max_mb)
            .field("fields", &redacted(&self.fields, &self.secrets))
            .finish()
    }
}

/// `fields` with whatever sits at a secret-ref field replaced, for logs and `Debug`.
pub fn redacted(fields: &Map<String, Value>, secrets: &SecretPaths) -> Map<String, Value> {
    let mut shown = fields.clone();
    for location in secrets.locations_in(fields) {
        if let Some(value) = location.get_mut(&mut shown)
            && !is_secret_reference(value)
        {
            *value = Value::String("[redacted]".to_owned());
        }
    }
    shown
}

impl SandboxConfig {
    /// The sync-back bound in MiB, default applied.
    pub fn sync_back_limit_mb(&self) -> u64 {
        self.sync_back_max_mb.unwrap_or(DEFAULT_SYNC_BACK_MAX_MB)
    }
}

/// A `plugin` config. Its `Debug` prints no secret.
#[derive(Clone, PartialEq)]
pub struct PluginConfig {
    pub plugin_key: String,
    pub driver_key: String,
    /// Validated against the plugin driver's schema, defaults applied; secret-ref fields as in
    /// [`SandboxConfig::fields`].
    pub driver_config: Map<String, Value>,
    /// Where the driver's schema keeps secrets.
    pub secrets: SecretPaths,
    /// The default command timeout (`timeoutMs`), berth's: beside `driverConfig`, never sent to the plugin.
    pub timeout_ms: Option<u64>,
}

impl fmt::Debug for PluginConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginConfig")
            .field("plugin_key", &self.plugin_key)
            .field("driver_key", &self.driver_key)
            .field(
                "driver_config",
                &redacted(&self.driver_config, &self.secrets),
            )
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl DriverConfig {
    /// Parses and validates `config` for `driver`, reporting every problem under the `config` path.
    pub fn parse(
        driver: Driver,
        config: &Value,
        catalog: &dyn ProviderCatalog,
    ) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let Some(reader) = ObjectReader::new(CONFIG_PATH, config, &mut errors) else {
            return Err(errors);
        };
        let parsed = match driver {
            Driver::Local => {
                let mut reader = reader;
                let timeout_ms = read_timeout_ms(&mut reader);
                reader.finish();
                DriverConfig::Local(LocalConfig { timeout_ms })
            }
            Driver::Ssh => DriverConfig::Ssh(parse_ssh(reader)),
            Driver::Sandbox => {
                let (mut sandbox, provider_fields) = parse_sandbox_envelope(reader);
                validate_provider_fields(&mut sandbox, provider_fields, catalog, &mut errors);
                DriverConfig::Sandbox(sandbox)
            }
            Driver::Plugin => {
                let mut plugin = parse_plugin(reader);
                validate_plugin_fields(&mut plugin, catalog, &mut errors);
                DriverConfig::Plugin(plugin)
            }
        };
        errors.into_result(parsed)
    }

    pub fn driver(&self) -> Driver {
        match self {
            DriverConfig::Local(_) => Driver::Local,
            DriverConfig::Ssh(_) => Driver::Ssh,
            DriverConfig::Sandbox(_) => Driver::Sandbox,
            DriverConfig::Plugin(_) => Driver::Plugin,
        }
    }

    /// A `local` config with nothing set.
    pub fn local() -> Self {
        DriverConfig::Local(LocalConfig::default())
    }

    /// The environment's default command timeout (`timeoutMs`), for runs that give none.
    pub fn timeout_ms(&self) -> Option<u64> {
        match self {
            DriverConfig::Local(local) => local.timeout_ms,
            DriverConfig::Ssh(ssh) => ssh.timeout_ms,
            DriverConfig::Sandbox(sandbox) => sandbox.timeout_ms,
            DriverConfig::Plugin(plugin) => plugin.timeout_ms,
        }
    }

    /// Secrets given inline, which the caller must store and [`bind`](Self::bind_secret) before persisting.
    pub fn inline_secrets(&self) -> Vec<(SecretField, SecretString)> {
        self.secret_slots()
            .into_iter()
            .filter_map(|(field, slot)| match slot {
                SecretSlot::Inline(value) => Some((field, value)),
                SecretSlot::Stored(_) => None,
            })
            .collect()
    }

    /// References to stored secrets this config holds.
    pub fn secret_refs(&self) -> Vec<(SecretField, SecretId)> {
        self.secret_slots()
            .into_iter()
            .filter_map(|(field, slot)| match slot {
                SecretSlot::Stored(id) => Some((field, id)),
                SecretSlot::Inline(_) => None,
            })
            .collect()
    }

    /// Replaces the inline value of `field` with a reference to the stored secret `id`.
    pub fn bind_secret(&mut self, field: &SecretField, id: SecretId) {
        self.put_secret(field, SecretSlot::Stored(id));
    }

    /// Puts a secret's value (decrypted by the caller at the moment of use) in place of its reference, so a driver
    /// can use it. A config holding a value can never be stored again: [`to_stored`](Self::to_stored) refuses it.
    pub fn set_resolved_secret(&mut self, field: &SecretField, value: SecretString) {
        self.put_secret(field, SecretSlot::Inline(value));
    }

    fn put_secret(&mut self, field: &SecretField, slot: SecretSlot) {
        let schema_value = |slot: SecretSlot| match slot {
            SecretSlot::Stored(id) => {
                let mut reference = Map::new();
                reference.insert(SECRET_REF_KEY.to_owned(), Value::String(id.to_string()));
                Value::Object(reference)
            }
            SecretSlot::Inline(value) => Value::String(value.expose_secret().to_owned()),
        };
        match (self, field) {
            (DriverConfig::Ssh(ssh), SecretField::SshPrivateKey) => ssh.private_key = Some(slot),
            (DriverConfig::Ssh(ssh), SecretField::SshPassword) => ssh.password = Some(slot),
            (DriverConfig::Sandbox(sandbox), SecretField::ProviderField(location)) => {
                if let Some(value) = location.get_mut(&mut sandbox.fields) {
                    *value = schema_value(slot);
                }
            }
            (DriverConfig::Plugin(plugin), SecretField::PluginDriverField(location)) => {
                if let Some(value) = location.get_mut(&mut plugin.driver_config) {
                    *value = schema_value(slot);
                }
            }
            _ => {}
        }
    }

    /// The stored (and returned) shape. `None` while an inline secret is still unbound: such a config must never be
    /// persisted, and this makes that impossible to do by accident.
    pub fn to_stored(&self) -> Option<Map<String, Value>> {
        if !self.inline_secrets().is_empty() {
            return None;
        }
        let mut stored = Map::new();
        if let Some(timeout_ms) = self.timeout_ms() {
            stored.insert(TIMEOUT_MS_KEY.to_owned(), timeout_ms.into());
        }
        match self {
            DriverConfig::Local(_) => {}
            DriverConfig::Ssh(ssh) => {
                stored.insert("host".to_owned(), ssh.host.clone().into());
                stored.insert("port".to_owned(), ssh.port.into());
                stored.insert("username".to_owned(), ssh.username.clone().into());
                stored.insert(
                    "remoteWorkspacePath".to_owned(),
                    ssh.remote_workspace_path.clone().into(),
                );
                for (field, id) in self.secret_refs() {
                    stored.insert(field.ref_path(), id.to_string().into());
                }
                if let Some(known_hosts) = &ssh.known_hosts {
                    stored.insert("knownHosts".to_owned(), known_hosts.clone().into());
                }
                stored.insert(
                    "strictHostKeyChecking".to_owned(),
                    ssh.strict_host_key_checking.into(),
                );
                stored.insert(
                    "workspaceMode".to_owned(),
                    ssh.workspace_mode.as_str().into(),
                );
                if !ssh.sync_exclude.is_empty() {
                    stored.insert(
                        "syncExclude".to_owned(),
                        ssh.sync_exclude.patterns().to_vec().into(),
                    );
                }
                if let Some(mb) = ssh.sync_back_max_mb {
                    stored.insert(SYNC_BACK_MAX_MB_KEY.to_owned(), mb.into());
                }
            }
            DriverConfig::Sandbox(sandbox) => {
                stored.insert("provider".to_owned(), sandbox.provider.clone().into());
                stored.insert("reuseLease".to_owned(), sandbox.reuse_lease.into());
                if let Some(mb) = sandbox.sync_back_max_mb {
                    stored.insert(SYNC_BACK_MAX_MB_KEY.to_owned(), mb.into());
                }
                stored.extend(sandbox.fields.clone());
            }
            DriverConfig::Plugin(plugin) => {
                stored.insert("pluginKey".to_owned(), plugin.plugin_key.clone().into());
                stored.insert("driverKey".to_owned(), plugin.driver_key.clone().into());
                stored.insert(
                    "driverConfig".to_owned(),
                    Value::Object(plugin.driver_config.clone()),
                );
            }
        }
        Some(stored)
    }

    fn secret_slots(&self) -> Vec<(SecretField, SecretSlot)> {
        let copy = |slot: &SecretSlot| match slot {
            SecretSlot::Stored(id) => SecretSlot::Stored(*id),
            SecretSlot::Inline(value) => {
                SecretSlot::Inline(SecretString::from(value.expose_secret().to_owned()))
            }
        };
        match self {
            DriverConfig::Ssh(ssh) => [
                (SecretField::SshPrivateKey, ssh.private_key.as_ref()),
                (SecretField::SshPassword, ssh.password.as_ref()),
            ]
            .into_iter()
            .filter_map(|(field, slot)| slot.map(|slot| (field, copy(slot))))
            .collect(),
            DriverConfig::Sandbox(sandbox) => schema_slots(
                &sandbox.fields,
                &sandbox.secrets,
                SecretField::ProviderField,
            ),
            DriverConfig::Plugin(plugin) => schema_slots(
                &plugin.driver_config,
                &plugin.secrets,
                SecretField::PluginDriverField,
            ),
            DriverConfig::Local(_) => Vec::new(),
        }
    }
}

/// The secret slots at a schema's secret-ref fields: a string is a value given inline, `{"secretRef": id}` a stored
/// secret. Anything else there failed validation already.
fn schema_slots(
    fields: &Map<String, Value>,
    secrets: &SecretPaths,
    field: fn(SecretLocation) -> SecretField,
) -> Vec<(SecretField, SecretSlot)> {
    secrets
        .locations_in(fields)
        .into_iter()
        .filter_map(|location| {
            let slot = match location.get(fields)? {
                Value::String(value) => SecretSlot::Inline(SecretString::from(value.clone())),
                other => SecretSlot::Stored(secret_reference(other)?.parse().ok()?),
            };
            Some((field(location), slot))
        })
        .collect()
}

/// Every secret a stored config refers to, found without its provider's schema (which may be gone from this
/// build): SSH's reference keys and every `{"secretRef": id}` object at any depth.
pub fn stored_secret_refs(stored: &Map<String, Value>) -> Vec<SecretId> {
    fn walk(value: &Value, found: &mut Vec<SecretId>) {
        if let Some(id) = secret_reference(value).and_then(|text| text.parse().ok()) {
            found.push(id);
            return;
        }
        match value {
            Value::Object(object) => object.values().for_each(|value| walk(value, found)),
            Value::Array(items) => items.iter().for_each(|value| walk(value, found)),
            _ => {}
        }
    }
    let mut found: Vec<SecretId> = WRITE_ONLY_KEYS
        .iter()
        .filter_map(|field| stored.get(field.ref_key())?.as_str()?.parse().ok())
        .collect();
    for value in stored.values() {
        walk(value, &mut found);
    }
    found.sort();
    found.dedup();
    found
}

/// Merges a PATCH's config over the stored one (same driver). Keys in `patch` replace stored keys; a `null` removes
/// the key; a write-only secret value replaces the stored reference it stands for, so the two never coexist.
pub fn merge_config(stored: &Map<String, Value>, patch: &Map<String, Value>) -> Map<String, Value> {
    let mut merged = stored.clone();
    for field in WRITE_ONLY_KEYS {
        if patch
            .get(field.value_key())
            .is_some_and(|value| !value.is_null())
        {
            merged.remove(field.ref_key());
        }
    }
    for (key, value) in patch {
        if value.is_null() {
            merged.remove(key);
        } else {
            merged.insert(key.clone(), value.clone());
        }
    }
    merged
}

fn parse_ssh(mut reader: ObjectReader<'_>) -> SshConfig {
    let host = reader.required_string("host").unwrap_or_default();
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) || host.starts_with('-') {
        reader.error(
            "host",
            "must be a host name or address without spaces, and must not start with '-'",
        );
    }
    let port = reader.optional_integer("port", 1, 65_535).unwrap_or(22);
    let username = reader.required_string("username").unwrap_or_default();
    if username
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
        || username.starts_with('-')
    {
        reader.error(
            "username",
            "must not contain spaces and must not start with '-'",
        );
    }
    let remote_workspace_path = reader
        .required_string("remoteWorkspacePath")
        .unwrap_or_default();
    if !remote_workspace_path.is_empty() && !remote_workspace_path.starts_with('/') {
        reader.error("remoteWorkspacePath", "must be an absolute path");
    } else if remote_workspace_path
        .split('/')
        .any(|segment| segment == "..")
    {
        reader.error("remoteWorkspacePath", "must not contain '..' segments");
    } else if remote_workspace_path.chars().any(char::is_control) {
        reader.error("remoteWorkspacePath", "must not contain control characters");
    }
    let private_key = read_secret_slot(&mut reader, SecretField::SshPrivateKey);
    let password = read_secret_slot(&mut reader, SecretField::SshPassword);
    let known_hosts = reader.optional_raw_string("knownHosts");
    let strict_host_key_checking = reader.bool_or("strictHostKeyChecking", true);
    let workspace_mode = match reader.optional_string("workspaceMode") {
        None => WorkspaceMode::PerRun,
        Some(text) => text.parse().unwrap_or_else(|err: UnknownVariant| {
            reader.error("workspaceMode", err.to_string());
            WorkspaceMode::PerRun
        }),
    };
    let mut sync_exclude = SyncExclude::default();
    if let Some(patterns) = reader.optional_string_array("syncExclude") {
        if patterns.len() > MAX_EXCLUDE_PATTERNS {
            reader.error(
                "syncExclude",
                format!("must hold at most {MAX_EXCLUDE_PATTERNS} patterns"),
            );
        }
        for (index, pattern) in patterns.iter().enumerate() {
            if let Some(problem) = SyncExclude::problem(pattern) {
                reader.error("syncExclude", format!("[{index}] {problem}"));
            }
        }
        sync_exclude.patterns = patterns;
    }
    let sync_back_max_mb = read_sync_back_max_mb(&mut reader);
    let timeout_ms = read_timeout_ms(&mut reader);
    reader.finish();
    SshConfig {
        host,
        port: u16::try_from(port).unwrap_or(22),
        username,
        remote_workspace_path,
        private_key,
        password,
        known_hosts,
        strict_host_key_checking,
        workspace_mode,
        sync_exclude,
        sync_back_max_mb,
        timeout_ms,
    }
}

/// `timeoutMs`: whole milliseconds, 1 to [`MAX_TIMEOUT_MS`].
fn read_timeout_ms(reader: &mut ObjectReader<'_>) -> Option<u64> {
    reader
        .optional_integer(TIMEOUT_MS_KEY, 1, MAX_TIMEOUT_MS)
        .and_then(|ms| u64::try_from(ms).ok())
}

/// `syncBackMaxMb`: a whole number of MiB, at least 1.
fn read_sync_back_max_mb(reader: &mut ObjectReader<'_>) -> Option<u64> {
    reader
        .optional_integer(SYNC_BACK_MAX_MB_KEY, 1, MAX_SYNC_BACK_MAX_MB)
        .and_then(|mb| u64::try_from(mb).ok())
}

fn read_secret_slot(reader: &mut ObjectReader<'_>, field: SecretField) -> Option<SecretSlot> {
    let inline = reader.optional_raw_string(field.value_key());
    let reference = reader.optional_string(field.ref_key());
    match (inline, reference) {
        (Some(_), Some(_)) => {
            let message = format!(
                "give either {} or {}, not both",
                field.value_key(),
                field.ref_key()
            );
            reader.error(field.value_key(), message);
            None
        }
        (Some(value), None) => Some(SecretSlot::Inline(SecretString::from(value))),
        (None, Some(reference)) => match reference.parse::<SecretId>() {
            Ok(id) => Some(SecretSlot::Stored(id)),
            Err(_) => {
                reader.error(field.ref_key(), "must be a secret id");
                None
            }
        },
        (None, None) => None,
    }
}

/// Reads the envelope every sandbox config shares; returns it with the remaining (provider) fields.
fn parse_sandbox_envelope(mut reader: ObjectReader<'_>) -> (SandboxConfig, Map<String, Value>) {
    let provider = reader.required_string("provider").unwrap_or_default();
    let reuse_lease = reader.bool_or("reuseLease", false);
    let timeout_ms = read_timeout_ms(&mut reader);
    let sync_back_max_mb = read_sync_back_max_mb(&mut reader);
    let provider_fields = reader.into_remaining();
    (
        SandboxConfig {
            provider,
            reuse_lease,
            timeout_ms,
            sync_back_max_mb,
            fields: Map::new(),
            secrets: SecretPaths::default(),
        },
        provider_fields,
    )
}

/// Checks the provider fields against the provider's schema; unknown providers are reported at `config.provider`.
fn validate_provider_fields(
    sandbox: &mut SandboxConfig,
    provider_fields: Map<String, Value>,
    catalog: &dyn ProviderCatalog,
    errors: &mut ValidationErrors,
) {
    match catalog.provider(&sandbox.provider) {
        Some(descriptor) => {
            sandbox.fields = descriptor.validate_fields(CONFIG_PATH, provider_fields, errors);
            sandbox.secrets = descriptor.secret_paths().clone();
            check_reference_ids(CONFIG_PATH, &sandbox.fields, &sandbox.secrets, errors);
        }
        None if sandbox.provider.is_empty() => {}
        None => {
            let installed = catalog.provider_keys().join(", ");
            errors.push(
                join_path(CONFIG_PATH, "provider"),
                format!(
                    "unknown sandbox provider `{}` (installed: {installed})",
                    sandbox.provider
                ),
            );
        }
    }
}

/// Checks a plugin config's `driverConfig` against its plugin driver's schema; an unknown plugin driver is reported at
/// `config.driverKey`.
fn validate_plugin_fields(
    plugin: &mut PluginConfig,
    catalog: &dyn ProviderCatalog,
    errors: &mut ValidationErrors,
) {
    if plugin.plugin_key.is_empty() || plugin.driver_key.is_empty() {
        return;
    }
    match catalog.plugin_driver(&plugin.plugin_key, &plugin.driver_key) {
        Some(descriptor) => {
            let prefix = join_path(CONFIG_PATH, DRIVER_CONFIG_KEY);
            plugin.driver_config = descriptor.validate_fields(
                &prefix,
                std::mem::take(&mut plugin.driver_config),
                errors,
            );
            plugin.secrets = descriptor.secret_paths().clone();
            check_reference_ids(&prefix, &plugin.driver_config, &plugin.secrets, errors);
        }
        None => {
            let installed = catalog.plugin_driver_keys();
            let installed = if installed.is_empty() {
                "none".to_owned()
            } else {
                installed.join(", ")
            };
            errors.push(
                join_path(CONFIG_PATH, "driverKey"),
                format!(
                    "no installed plugin `{}` offers the environment driver `{}` (installed: {installed})",
                    plugin.plugin_key, plugin.driver_key
                ),
            );
        }
    }
}

/// A `{"secretRef": ...}` at a secret-ref field must name a secret id.
fn check_reference_ids(
    prefix: &str,
    fields: &Map<String, Value>,
    secrets: &SecretPaths,
    errors: &mut ValidationErrors,
) {
    for location in secrets.locations_in(fields) {
        if let Some(text) = location.get(fields).and_then(secret_reference)
            && text.parse::<SecretId>().is_err()
        {
            errors.push(
                join_path(&join_path(prefix, &location.to_string()), SECRET_REF_KEY),
                "must be a secret id",
            );
        }
    }
}

fn parse_plugin(mut reader: ObjectReader<'_>) -> PluginConfig {
    let plugin_key = reader.required_string("pluginKey").unwrap_or_default();
    let driver_key = reader.required_string("driverKey").unwrap_or_default();
    if !driver_key.is_empty() && !is_valid_key(&driver_key) {
        reader.error(
            "driverKey",
            "must match ^[a-z0-9][a-z0-9._-]*$ (at most 64 characters)",
        );
    }
    let driver_config = reader
        .optional_object(DRIVER_CONFIG_KEY)
        .unwrap_or_default();
    let timeout_ms = read_timeout_ms(&mut reader);
    reader.finish();
    PluginConfig {
        plugin_key,
        driver_key,
        driver_config,
        secrets: SecretPaths::default(),
        timeout_ms,
    }
}

#[cfg(test)]
mod tests;
