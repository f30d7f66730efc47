//! Typed identifiers. Every id is a UUID on the inside and an opaque string on the outside; the types keep a lease id
//! from ever being passed where an environment id is expected.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::Error;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh id. Version 7 UUIDs sort by creation time, which keeps database indexes append-mostly.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.as_hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(value: &str) -> Result<Self, Error> {
                // Only the canonical hyphenated form: ids are opaque to clients, and one spelling per id keeps
                // lookups and logs unambiguous.
                if value.len() != 36 {
                    return Err(Error::InvalidId { what: $what, value: value.to_owned() });
                }
                Uuid::try_parse(value)
                    .map(Self)
                    .map_err(|_| Error::InvalidId { what: $what, value: value.to_owned() })
            }
        }
    };
}

typed_id!(
    /// A tenant: everything berth stores belongs to exactly one company.
    CompanyId,
    "company"
);
typed_id!(
    /// A company API key (its secret is never stored, only its hash).
    ApiKeyId,
    "api key"
);
typed_id!(
    /// An environment: where runs execute.
    EnvironmentId,
    "environment"
);
typed_id!(
    /// A lease on an environment.
    LeaseId,
    "lease"
);
typed_id!(
    /// One execution of one command.
    RunId,
    "run"
);
typed_id!(
    /// An encrypted secret referenced from an environment config.
    SecretId,
    "secret"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_string_form() {
        let id = EnvironmentId::new();
        let parsed: EnvironmentId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
    }

    #[test]
    fn ids_reject_other_spellings() {
        let id = LeaseId::new();
        let simple = id.as_uuid().simple().to_string();
        assert!(simple.parse::<LeaseId>().is_err());
        assert!("../etc/passwd".parse::<LeaseId>().is_err());
        assert!("".parse::<LeaseId>().is_err());
        let err = "nope".parse::<RunId>().unwrap_err();
        assert_eq!(err.code(), "invalid_id");
        assert!(err.to_string().contains("run"));
    }
}
