//! Provider descriptors and the catalog of installed providers.
//!
//! Config validation (`config`) checks a `sandbox` config's provider fields against the installed providers, and the
//! provider contract (`provider`) names the descriptor a provider registers with: both need these types, so they
//! live here, below both, rather than in either.

use std::fmt;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::secret_paths::{SecretLocation, SecretPaths};
use crate::validation::{ValidationErrors, join_path};

/// What a provider tells berth about itself when it is registered.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    /// The value of `config.provider` that selects this provider: `^[a-z0-9][a-z0-9._-]*$`.
    pub key: String,
    pub display_name: String,
    pub description: String,
    /// JSON Schema for the provider's own fields (everything but `provider`, `reuseLease` and `timeoutMs`).
    /// Top-level `default`s are applied to stored configs; properties with `"format": "secret-ref"` hold secrets.
    pub config_schema: Value,
    pub supports_reusable_leases: bool,
    pub supports_run_execution: bool,
}

/// A registered provider: its spec plus the compiled validator for its config schema.
pub struct ProviderDescriptor {
    spec: ProviderSpec,
    validator: jsonschema::Validator,
    secrets: SecretPaths,
}

impl fmt::Debug for ProviderDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderDescriptor")
            .field("key", &self.spec.key)
            .finish_non_exhaustive()
    }
}

impl ProviderDescriptor {
    /// Checks the spec (key syntax, schema against its meta-schema) and compiles the schema once.
    pub fn new(spec: ProviderSpec) -> Result<Self, Error> {
        let invalid = |message: String| Error::InvalidProviderSchema {
            provider: spec.key.clone(),
            message,
        };
        if !is_valid_key(&spec.key) {
            return Err(invalid(
                "the key must match ^[a-z0-9][a-z0-9._-]*$ (at most 64 characters)".to_owned(),
            ));
        }
        if !spec.config_schema.is_object() {
            return Err(invalid(
                "the config schema must be a JSON object".to_owned(),
            ));
        }
        jsonschema::meta::validate(&spec.config_schema).map_err(|err| invalid(err.to_string()))?;
        let validator = jsonschema::validator_for(&spec.config_schema)
            .map_err(|err| invalid(err.to_string()))?;
        let secrets = SecretPaths::of(&spec.config_schema);
        Ok(Self {
            spec,
            validator,
            secrets,
        })
    }

    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    pub fn key(&self) -> &str {
        &self.spec.key
    }

    /// Where the config schema keeps secrets (`"format": "secret-ref"`).
    pub fn secret_paths(&self) -> &SecretPaths {
        &self.secrets
    }

    /// Validates the provider's fields, found at `prefix`, and returns them with the schema's top-level defaults
    /// applied. Error messages never quote the offending value: it may be a secret.
    pub fn validate_fields(
        &self,
        prefix: &str,
        fields: Map<String, Value>,
        errors: &mut ValidationErrors,
    ) -> Map<String, Value> {
        let mut fields = fields;
        if let Some(Value::Object(properties)) = self.spec.config_schema.get("properties") {
            for (name, property) in properties {
                if let Some(default) = property.get("default")
                    && !fields.contains_key(name)
                {
                    fields.insert(name.clone(), default.clone());
                }
            }
        }
        // A secret stored earlier sits in the config as `{"secretRef": id}`, where the schema has a string: what is
        // checked there is the secret's value, checked when it was given, not the reference.
        let references: Vec<SecretLocation> = self
            .secrets
            .locations_in(&fields)
            .into_iter()
            .filter(|location| location.get(&fields).is_some_and(is_secret_reference))
            .collect();
        let mut checked = fields.clone();
        for location in &references {
            if let Some(value) = location.get_mut(&mut checked) {
                *value = Value::String(String::new());
            }
        }
        let checked = Value::Object(checked);
        for error in self.validator.iter_errors(&checked) {
            let pointer = error.instance_path().to_string();
            if references
                .iter()
                .any(|location| location.is_at_pointer(&pointer))
            {
                continue;
            }
            let mut path = prefix.to_owned();
            for segment in error.instance_path().iter() {
                path = join_path(&path, &segment.to_string());
            }
            errors.push(path, error.masked().to_string());
        }
        fields
    }
}

/// The key of a stored secret's reference object, `{"secretRef": "<id>"}`, in schema-described configs.
pub const SECRET_REF_KEY: &str = "secretRef";

/// Whether `value` is a reference to a stored secret: `{"secretRef": "<id>"}` and nothing else.
pub fn is_secret_reference(value: &Value) -> bool {
    secret_reference(value).is_some()
}

/// The id text of a reference to a stored secret, `{"secretRef": "<id>"}`.
pub fn secret_reference(value: &Value) -> Option<&str> {
    match value {
        Value::Object(object) if object.len() == 1 => object.get(SECRET_REF_KEY)?.as_str(),
        _ => None,
    }
}

/// Whether `key` is a valid provider or driver key: `^[a-z0-9][a-z0-9._-]*$`, at most 64 characters.
pub fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    key.len() <= 64
        && chars
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// Looks up installed sandbox providers by key. Config validation needs it to check provider fields.
pub trait ProviderCatalog {
    fn provider(&self, key: &str) -> Option<&ProviderDescriptor>;

    /// Every installed provider key, for error messages.
    fn provider_keys(&self) -> Vec<String>;

    /// A plugin's `environment_driver` (`driver: "plugin"` configs), by plugin id and driver key.
    fn plugin_driver(&self, _plugin_key: &str, _driver_key: &str) -> Option<&ProviderDescriptor> {
        None
    }

    /// The installed plugin drivers, as `pluginKey/driverKey`, for error messages.
    fn plugin_driver_keys(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(schema: Value) -> ProviderSpec {
        ProviderSpec {
            key: "demo".to_owned(),
            display_name: "Demo".to_owned(),
            description: "A demo provider".to_owned(),
            config_schema: schema,
            supports_reusable_leases: true,
            supports_run_execution: false,
        }
    }

    #[test]
    fn invalid_schemas_and_keys_are_refused_at_registration() {
        assert!(ProviderDescriptor::new(spec(json!({"type": 12}))).is_err());
        assert!(ProviderDescriptor::new(spec(json!([]))).is_err());
        let mut bad_key = spec(json!({}));
        bad_key.key = "Bad Key".to_owned();
        assert!(ProviderDescriptor::new(bad_key).is_err());
        assert!(is_valid_key("e2b"));
        assert!(is_valid_key("fake-plugin.v2"));
        assert!(!is_valid_key("-x"));
        assert!(!is_valid_key(""));
    }

    #[test]
    fn fields_get_defaults_and_masked_errors_with_paths() {
        let descriptor = ProviderDescriptor::new(spec(json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "image": {"type": "string", "default": "fake:latest"},
                "cpus": {"type": "integer", "minimum": 1}
            }
        })))
        .unwrap();
        let mut errors = ValidationErrors::new();
        let fields = descriptor.validate_fields("config", Map::new(), &mut errors);
        assert!(errors.is_empty());
        assert_eq!(fields["image"], "fake:latest");

        let mut input = Map::new();
        input.insert("cpus".to_owned(), json!("sekrit-value"));
        input.insert("bogus".to_owned(), json!(1));
        descriptor.validate_fields("config", input, &mut errors);
        let rendered = format!("{:?}", errors.errors());
        assert!(
            errors.errors().iter().any(|e| e.path == "config.cpus"),
            "{rendered}"
        );
        assert!(
            errors.errors().iter().any(|e| e.path == "config"),
            "{rendered}"
        );
        assert!(!rendered.contains("sekrit-value"), "{rendered}");
    }
}
