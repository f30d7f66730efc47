//! Where a provider's config schema keeps secrets: every `"format": "secret-ref"` property, at any depth (nested
//! objects, array items, the branches of `allOf`/`anyOf`/`oneOf`), as PLUGINS.md §5 defines them.

use std::collections::BTreeSet;
use std::fmt;

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

    /// Whether the schema has no secret-ref field.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The string values `fields` holds at those locations (resolved secrets, in a config ready for a call).
    pub fn values_in(&self, fields: &Map<String, Value>) -> BTreeSet<String> {
        self.locations_in(fields)
            .iter()
            .filter_map(|location| location.get(fields))
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    }

    /// Every place in `fields` that holds a value (of any type) where the schema keeps a secret.
    pub fn locations_in(&self, fields: &Map<String, Value>) -> Vec<SecretLocation> {
        let mut found = BTreeSet::new();
        for path in &self.0 {
            if let Some((Step::Property(name), rest)) = path.split_first()
                && let Some(value) = fields.get(name)
            {
                let mut at = vec![Segment::Key(name.clone())];
                locations_at(value, rest, &mut at, &mut found);
            }
        }
        found.into_iter().collect()
    }
}

/// One step to a concrete place in a config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A concrete place in a config's fields where a secret sits: `apiKey`, `auth.token`, `users[2].password`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretLocation(Vec<Segment>);

impl SecretLocation {
    pub fn get<'a>(&self, fields: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.0.split_first()?;
        let Segment::Key(name) = first else {
            return None;
        };
        rest.iter()
            .try_fold(fields.get(name)?, |value, segment| match segment {
                Segment::Key(key) => value.get(key),
                Segment::Index(index) => value.get(index),
            })
    }

    pub fn get_mut<'a>(&self, fields: &'a mut Map<String, Value>) -> Option<&'a mut Value> {
        let (first, rest) = self.0.split_first()?;
        let Segment::Key(name) = first else {
            return None;
        };
        rest.iter()
            .try_fold(fields.get_mut(name)?, |value, segment| match segment {
                Segment::Key(key) => value.get_mut(key),
                Segment::Index(index) => value.get_mut(index),
            })
    }

    /// Whether a validation error at `pointer` (a JSON pointer into the fields, `/users/2/password`) is about this
    /// place itself.
    pub fn is_at_pointer(&self, pointer: &str) -> bool {
        let mut parts = pointer.split('/').skip(1);
        self.0.iter().all(|segment| {
            let Some(part) = parts.next() else {
                return false;
            };
            let part = part.replace("~1", "/").replace("~0", "~");
            match segment {
                Segment::Key(key) => *key == part,
                Segment::Index(index) => index.to_string() == part,
            }
        }) && parts.next().is_none()
    }
}

impl fmt::Display for SecretLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if position == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
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

fn locations_at(
    value: &Value,
    path: &[Step],
    at: &mut Vec<Segment>,
    found: &mut BTreeSet<SecretLocation>,
) {
    match path.split_first() {
        None => {
            found.insert(SecretLocation(at.clone()));
        }
        Some((Step::Property(name), rest)) => {
            if let Some(child) = value.get(name) {
                at.push(Segment::Key(name.clone()));
                locations_at(child, rest, at, found);
                at.pop();
            }
        }
        Some((Step::AnyItem, rest)) => {
            if let Value::Array(items) = value {
                for (index, item) in items.iter().enumerate() {
                    at.push(Segment::Index(index));
                    locations_at(item, rest, at, found);
                    at.pop();
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
        let places: Vec<String> = paths
            .locations_in(&config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            places,
            [
                "apiKey",
                "list[0].password",
                "list[1].password",
                "nested.token",
                "other"
            ]
        );
        let third = &paths.locations_in(&config)[2];
        assert!(third.is_at_pointer("/list/1/password"));
        assert!(!third.is_at_pointer("/list/1"));
        assert_eq!(third.get(&config), Some(&json!("p-4")));
        assert!(
            SecretPaths::of(&json!({"properties": {"a": {"type": "string"}}}))
                .values_in(&config)
                .is_empty()
        );
    }
}
