//! Validation that reports every problem at once, each with the path of the offending field (`config.port`).
//!
//! Configs arrive as JSON values. Rather than stop at the first serde error, [`ObjectReader`] walks an object field by
//! field, records a [`FieldError`] for each problem, and finally reports the keys nobody asked for: unknown fields are
//! errors (strict schemas), never silently dropped.

use std::fmt;

use serde_json::{Map, Value};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the request body's root, e.g. `config.remoteWorkspacePath`.
    pub path: String,
    pub message: String,
}

/// Every problem found in one request. Never empty when returned as an error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationErrors {
    errors: Vec<FieldError>,
}

impl ValidationErrors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errors = Self::new();
        errors.push(path, message);
        errors
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn extend(&mut self, other: ValidationErrors) {
        self.errors.extend(other.errors);
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.errors
    }

    /// `Ok(value)` when nothing was recorded, else the errors.
    pub fn into_result<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.as_slice() {
            [] => f.write_str("validation failed"),
            // A problem with the whole body has no path; a bare ": " before its message would read as a glitch.
            [only] if only.path.is_empty() => f.write_str(&only.message),
            [only] => write!(f, "{}: {}", only.path, only.message),
            [first, rest @ ..] => {
                write!(
                    f,
                    "{}: {} (and {} more problem",
                    first.path,
                    first.message,
                    rest.len()
                )?;
                f.write_str(if rest.len() == 1 { ")" } else { "s)" })
            }
        }
    }
}

impl std::error::Error for ValidationErrors {}

/// Joins a path prefix and a key: `join("config", "port") == "config.port"`.
pub fn join_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Names a JSON value's type for error messages.
pub fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the fields of one JSON object, recording problems instead of stopping at the first one.
#[derive(Debug)]
pub struct ObjectReader<'a> {
    prefix: String,
    object: &'a Map<String, Value>,
    known: Vec<&'static str>,
    errors: &'a mut ValidationErrors,
}

impl<'a> ObjectReader<'a> {
    /// Starts reading `value` as an object found at `prefix`. Returns `None` (with an error recorded) when it is not
    /// an object.
    pub fn new(prefix: &str, value: &'a Value, errors: &'a mut ValidationErrors) -> Option<Self> {
        match value {
            Value::Object(object) => Some(Self {
                prefix: prefix.to_owned(),
                object,
                known: Vec::new(),
                errors,
            }),
            other => {
                errors.push(
                    prefix,
                    format!("must be an object, not {}", json_type_name(other)),
                );
                None
            }
        }
    }

    pub fn path(&self, key: &str) -> String {
        join_path(&self.prefix, key)
    }

    /// Records a problem with `key`.
    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        let path = self.path(key);
        self.errors.push(path, message);
    }

    /// The raw value of `key`, marking it known. `null` reads as absent: clients may send `null` for "not set".
    pub fn value(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        match self.object.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(value),
        }
    }

    /// An optional string, trimmed; an empty string reads as absent.
    pub fn optional_string(&mut self, key: &'static str) -> Option<String> {
        match self.value(key)? {
            Value::String(text) => {
                let trimmed = text.trim();
                (!trimmed.is_empty()).then(|| trimmed.to_owned())
            }
            other => {
                let message = format!("must be a string, not {}", json_type_name(other));
                self.error(key, message);
                None
            }
        }
    }

    /// A required, non-empty string, trimmed.
    pub fn required_string(&mut self, key: &'static str) -> Option<String> {
        let problems_before = self.errors.errors().len();
        let value = self.optional_string(key);
        // A wrong type was already reported; only a missing or blank value is "required".
        if value.is_none() && self.errors.errors().len() == problems_before {
            self.error(key, "is required and must not be empty");
        }
        value
    }

    /// An optional string kept verbatim (no trimming): for secrets and key material, where whitespace matters.
    pub fn optional_raw_string(&mut self, key: &'static str) -> Option<String> {
        match self.value(key)? {
            Value::String(text) if text.trim().is_empty() => None,
            Value::String(text) => Some(text.clone()),
            other => {
                let message = format!("must be a string, not {}", json_type_name(other));
                self.error(key, message);
                None
            }
        }
    }

    /// An optional array of strings (kept verbatim); an element of another type is reported with its index.
    pub fn optional_string_array(&mut self, key: &'static str) -> Option<Vec<String>> {
        match self.value(key)? {
            Value::Array(items) => {
                let mut strings = Vec::with_capacity(items.len());
                let mut problems = Vec::new();
                for (index, item) in items.iter().enumerate() {
                    match item {
                        Value::String(text) => strings.push(text.clone()),
                        other => problems.push(format!(
                            "[{index}] must be a string, not {}",
                            json_type_name(other)
                        )),
                    }
                }
                for problem in problems {
                    self.error(key, problem);
                }
                Some(strings)
            }
            other => {
                let message = format!("must be an array of strings, not {}", json_type_name(other));
                self.error(key, message);
                None
            }
        }
    }

    pub fn bool_or(&mut self, key: &'static str, default: bool) -> bool {
        match self.value(key) {
            None => default,
            Some(Value::Bool(flag)) => *flag,
            Some(other) => {
                let message = format!("must be a boolean, not {}", json_type_name(other));
                self.error(key, message);
                default
            }
        }
    }

    /// An optional integer within `min..=max`.
    pub fn optional_integer(&mut self, key: &'static str, min: i64, max: i64) -> Option<i64> {
        let value = self.value(key)?;
        match value.as_i64() {
            Some(number) if (min..=max).contains(&number) => Some(number),
            Some(_) => {
                self.error(key, format!("must be between {min} and {max}"));
                None
            }
            None if value.is_number() => {
                self.error(
                    key,
                    format!("must be a whole number between {min} and {max}"),
                );
                None
            }
            None => {
                let message = format!("must be a number, not {}", json_type_name(value));
                self.error(key, message);
                None
            }
        }
    }

    /// An optional object, kept as is.
    pub fn optional_object(&mut self, key: &'static str) -> Option<Map<String, Value>> {
        match self.value(key)? {
            Value::Object(object) => Some(object.clone()),
            other => {
                let message = format!("must be an object, not {}", json_type_name(other));
                self.error(key, message);
                None
            }
        }
    }

    /// Ends reading and hands back the fields nobody read, for readers that pass them on (sandbox provider fields
    /// are validated by the provider's schema, not here).
    pub fn into_remaining(self) -> Map<String, Value> {
        self.object
            .iter()
            .filter(|(key, _)| !self.known.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// Ends reading, recording every key that was never asked for as unknown.
    pub fn finish(self) {
        for key in self.object.keys() {
            if !self.known.contains(&key.as_str()) {
                self.errors
                    .push(join_path(&self.prefix, key), "unknown field");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reader_reports_every_problem_with_its_path() {
        let value = json!({"host": "", "port": "22", "extra": 1, "flag": "yes"});
        let mut errors = ValidationErrors::new();
        let mut reader = ObjectReader::new("config", &value, &mut errors).unwrap();
        assert_eq!(reader.required_string("host"), None);
        assert_eq!(reader.optional_integer("port", 1, 65535), None);
        assert!(reader.bool_or("flag", true));
        reader.finish();
        let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["config.host", "config.port", "config.flag", "config.extra"]
        );
    }

    #[test]
    fn missing_required_field_is_reported() {
        let value = json!({});
        let mut errors = ValidationErrors::new();
        let mut reader = ObjectReader::new("config", &value, &mut errors).unwrap();
        assert_eq!(reader.required_string("username"), None);
        reader.finish();
        assert_eq!(errors.errors()[0].path, "config.username");
        assert!(errors.to_string().contains("is required"));
    }

    #[test]
    fn non_object_is_reported_at_its_own_path() {
        let mut errors = ValidationErrors::new();
        assert!(ObjectReader::new("config", &json!([1]), &mut errors).is_none());
        assert_eq!(errors.errors()[0].path, "config");
        assert!(errors.errors()[0].message.contains("an array"));
    }
}
