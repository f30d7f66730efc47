//! Companies (tenants) and their API keys.

use std::fmt;
use std::str::FromStr;

use crate::ids::{ApiKeyId, CompanyId, EnvironmentId};
use crate::time::Timestamp;

/// The company every fresh berth has.
pub const DEFAULT_COMPANY_NAME: &str = "default";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Company {
    pub id: CompanyId,
    pub name: String,
    pub created_at: Timestamp,
    /// Where a run that names no environment runs; `None`: the company's Local environment. Always one of the
    /// company's own environments (the store keeps it pointing at an existing one).
    pub default_environment_id: Option<EnvironmentId>,
}

/// What a company API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKeyRole {
    /// Reads everything, mutates environments, starts runs.
    Manager,
    /// Reads, with environment config and metadata redacted; no lease routes.
    Reader,
}

impl ApiKeyRole {
    pub const ALL: [ApiKeyRole; 2] = [ApiKeyRole::Manager, ApiKeyRole::Reader];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyRole::Manager => "manager",
            ApiKeyRole::Reader => "reader",
        }
    }
}

impl fmt::Display for ApiKeyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApiKeyRole {
    type Err = UnknownVariant;

    fn from_str(value: &str) -> Result<Self, UnknownVariant> {
        parse_variant(value, &Self::ALL, |role| role.as_str())
    }
}

/// A company API key. Its secret is shown once at creation; only a hash is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub company_id: CompanyId,
    pub name: String,
    pub role: ApiKeyRole,
    pub created_at: Timestamp,
}

/// A string that names none of an enum's variants. The message lists the accepted ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownVariant {
    pub value: String,
    pub expected: Vec<&'static str>,
}

impl fmt::Display for UnknownVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not one of: {}",
            self.value,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for UnknownVariant {}

/// Parses `value` as one of `variants` by their string names.
pub fn parse_variant<T: Copy>(
    value: &str,
    variants: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, UnknownVariant> {
    variants
        .iter()
        .copied()
        .find(|variant| name(*variant) == value)
        .ok_or_else(|| UnknownVariant {
            value: value.to_owned(),
            expected: variants.iter().map(|variant| name(*variant)).collect(),
        })
}
