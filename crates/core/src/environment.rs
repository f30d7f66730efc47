//! Environments: where runs execute.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::company::{UnknownVariant, parse_variant};
use crate::ids::{CompanyId, EnvironmentId};
use crate::time::Timestamp;

/// The kind of place an environment is, and so which driver runs commands there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Driver {
    /// This machine.
    Local,
    /// A host reached over SSH.
    Ssh,
    /// A sandbox from a sandbox provider (built-in or plugin).
    Sandbox,
    /// An out-of-process driver plugin.
    Plugin,
}

impl Driver {
    pub const ALL: [Driver; 4] = [Driver::Local, Driver::Ssh, Driver::Sandbox, Driver::Plugin];

    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Local => "local",
            Driver::Ssh => "ssh",
            Driver::Sandbox => "sandbox",
            Driver::Plugin => "plugin",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Driver {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, Driver::as_str)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnvironmentStatus {
    Active,
    Archived,
}

impl EnvironmentStatus {
    pub const ALL: [EnvironmentStatus; 2] =
        [EnvironmentStatus::Active, EnvironmentStatus::Archived];

    pub fn as_str(self) -> &'static str {
        match self {
            EnvironmentStatus::Active => "active",
            EnvironmentStatus::Archived => "archived",
        }
    }
}

impl fmt::Display for EnvironmentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EnvironmentStatus {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, EnvironmentStatus::as_str)
    }
}

/// The name of the environment every company gets for this machine.
pub const LOCAL_ENVIRONMENT_NAME: &str = "Local";
pub const LOCAL_ENVIRONMENT_DESCRIPTION: &str = "Runs commands on the machine berth runs on.";

/// An environment as stored. `config` is always in its stored shape: validated, defaults applied, and holding secret
/// *references* only, never secret values.
#[derive(Clone, Debug, PartialEq)]
pub struct Environment {
    pub id: EnvironmentId,
    pub company_id: CompanyId,
    pub name: String,
    pub description: Option<String>,
    pub driver: Driver,
    pub status: EnvironmentStatus,
    pub config: Map<String, Value>,
    pub metadata: Option<Map<String, Value>>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Bumped on every update; the store uses it for optimistic concurrency.
    pub revision: i64,
}

impl Environment {
    /// The company's built-in environment for this machine.
    pub fn local_for(company_id: CompanyId, now: Timestamp) -> Self {
        let mut metadata = Map::new();
        metadata.insert("managedByBerth".to_owned(), Value::Bool(true));
        metadata.insert("defaultForCompany".to_owned(), Value::Bool(true));
        Self {
            id: EnvironmentId::new(),
            company_id,
            name: LOCAL_ENVIRONMENT_NAME.to_owned(),
            description: Some(LOCAL_ENVIRONMENT_DESCRIPTION.to_owned()),
            driver: Driver::Local,
            status: EnvironmentStatus::Active,
            config: Map::new(),
            metadata: Some(metadata),
            created_at: now,
            updated_at: now,
            revision: 0,
        }
    }
}

/// Longest accepted environment name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest accepted description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4_000;

/// Validates and normalizes a name: trimmed, non-empty, bounded, no control characters.
pub fn normalize_name(name: &str) -> Result<String, &'static str> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err("must not be empty");
    }
    if trimmed.chars().count() > MAX_NAME_CHARS {
        return Err("must be at most 200 characters");
    }
    if trimmed.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(trimmed.to_owned())
}

/// Checks a description's characters. A description is one paragraph of plain text shown in listings, so no control
/// character is allowed, not even a newline or tab: a NUL cannot be stored faithfully everywhere, and escape sequences
/// would garble every terminal that prints it. Leading and trailing whitespace is not checked: it is trimmed away.
pub fn check_description(text: &str) -> Result<(), &'static str> {
    if text.trim().chars().any(char::is_control) {
        return Err(
            "must not contain control characters (a description is one paragraph of plain text)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_parse_by_name_and_list_alternatives() {
        for driver in Driver::ALL {
            assert_eq!(driver.as_str().parse::<Driver>().unwrap(), driver);
        }
        let err = "docker".parse::<Driver>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "`docker` is not one of: local, ssh, sandbox, plugin"
        );
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(normalize_name("  build box ").unwrap(), "build box");
        assert!(normalize_name("   ").is_err());
        assert!(normalize_name(&"x".repeat(201)).is_err());
        assert!(normalize_name("a\u{0}b").is_err());
    }

    #[test]
    fn descriptions_refuse_control_characters_inside_the_text() {
        assert!(check_description("builds the docs, fast").is_ok());
        assert!(
            check_description("  padded\n").is_ok(),
            "surrounding whitespace is trimmed, not refused"
        );
        for bad in [
            "a\u{0}b",
            "one\ntwo",
            "tab\there",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}x",
        ] {
            let message = check_description(bad).unwrap_err();
            assert!(!message.contains(bad), "{message}");
        }
    }
}
