//! Where a provider's config schema keeps secrets: every `"format": "secret-ref"` property, at any depth (nested
//! objects, array items, the branches of `allOf`/`anyOf`/`oneOf`), as PLUGINS.md §5 defines them.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// One step into a config: an object's property or any item of an array.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Property(String),
    AnyItem,
}

/// The secret-ref locations of one schema, found once when the provider registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretPaths(Vec<Vec<Step>>);

impl SecretPaths {
    pub fn of(schema: &Value) -> Self {
        let mut found = Vec::new();
        collect(schema, &mut Vec::new(), &mut found);
        Self(found)
    }

    /// The string values `fields` holds at those locations (resolved secrets, in a config ready for a call).
    pub fn values_in(&self, fields: &Map<String, Value>) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for path in &self.0 {
            if let Some((Step::Property(name), rest)) = path.split_first()
                && let Some(value) = fields.get(name)
            {
                values_at(value, rest, &mut found);
            }
        }
        found
    }
}

fn collect(schema: &Value, at: &mut Vec<Step>, found: &mut Vec<Vec<Step>>) {
    let Value::Object(schema) = schema else {
        return;
    };
    if schema.get("format").and_then(Value::as_str) == Some("secret-ref") {
        found.push(at.clone());
    }
    if let Some(Value::Object(properties)) = schema.get("properties") {
        for (name, property) in properties {
            at.push(Step::Property(name.clone()));
            collect(property, at, found);
            at.pop();
        }
    }
    if let Some(items) = schema.get("items") {
        at.push(Step::AnyItem);
        collect(items, at, found);
        at.pop();
    }
    for combinator in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = schema.get(combinator) {
            for branch in branches {
                collect(branch, at, found);
            }
        }
    }
}

fn values_at(value: &Value, path: &[Step], found: &mut BTreeSet<String>) {
    match path.split_first() {
        None => {
            if let Value::String(text) = value {
                found.insert(text.clone());
            }
        }
        Some((Step::Property(name), rest)) => {
            if let Some(child) = value.get(name) {
                values_at(child, rest, found);
            }
        }
        Some((Step::AnyItem, rest)) => {
            if let Value::Array(items) = value {
                for item in items {
                    values_at(item, rest, found);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secrets_are_found_at_any_depth_and_nowhere_else() {
        let paths = SecretPaths::of(&json!({
            "type": "object",
            "properties": {
                "apiKey": {"type": "string", "format": "secret-ref"},
                "nested": {"properties": {"token": {"format": "secret-ref"}}},
                "list": {"items": {"properties": {"password": {"format": "secret-ref"}}}},
                "plain": {"type": "string"}
            },
            "anyOf": [{"properties": {"other": {"format": "secret-ref"}}}]
        }));
        let config = json!({
            "apiKey": "k-1", "nested": {"token": "t-2"}, "list": [{"password": "p-3"}, {"password": "p-4"}],
            "plain": "visible", "other": "o-5"
        });
        let Value::Object(config) = config else {
            unreachable!()
        };
        assert_eq!(
            paths.values_in(&config).into_iter().collect::<Vec<_>>(),
            ["k-1", "o-5", "p-3", "p-4", "t-2"]
        );
        assert!(
            SecretPaths::of(&json!({"properties": {"a": {"type": "string"}}}))
                .values_in(&config)
                .is_empty()
        );
    }
}
