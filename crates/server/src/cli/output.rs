//! What client subcommands share: reading arguments that name ids or hold JSON, and printing answers as JSON or as
//! aligned tables.

use anyhow::{Context, bail};
use serde_json::Value;

/// `--config '{"k": 1}'` or `--config @file.json`.
pub(super) fn parse_json_argument(flag: &str, text: &str) -> anyhow::Result<Value> {
    let (source, contents) = match text.strip_prefix('@') {
        Some(path) => (
            path.to_owned(),
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?,
        ),
        None => (flag.to_owned(), text.to_owned()),
    };
    serde_json::from_str(&contents).with_context(|| format!("{source} is not valid JSON"))
}

/// Ids go into URL paths; anything that is not a plain id token is refused rather than escaped into another route.
pub(super) fn path_segment(text: &str) -> anyhow::Result<&str> {
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("`{text}` is not a valid id");
    }
    Ok(text)
}

/// `path` with the given filters as its query string; values must be plain tokens (statuses, drivers, numbers).
pub(super) fn with_query(
    path: String,
    filters: &[(&str, Option<String>)],
) -> anyhow::Result<String> {
    let mut pairs = Vec::new();
    for (name, value) in filters {
        if let Some(value) = value {
            pairs.push(format!("{name}={}", path_segment(value)?));
        }
    }
    Ok(if pairs.is_empty() {
        path
    } else {
        format!("{path}?{}", pairs.join("&"))
    })
}

/// Prints an answer: as JSON with `--json`, else in its text form.
pub(super) fn show(json: bool, value: &Value, as_text: impl FnOnce(&Value)) {
    if json {
        print_json(value);
    } else {
        as_text(value);
    }
}

pub(super) fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(rendered) => println!("{rendered}"),
        Err(_) => println!("{value}"),
    }
}

/// A field as a table cell: strings as they are, numbers and booleans in JSON, absent or null as `-`.
pub(super) fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => sanitize(text),
        other => other.to_string(),
    }
}

/// Table cells come from the server and may hold what a user typed: control characters would let a value redraw
/// the terminal, so they are shown escaped.
fn sanitize(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.escape_default().to_string()
    } else {
        text.to_owned()
    }
}

/// Prints `rows` (each a JSON object) as a table with `columns`: `(heading, field)`. The last column is not padded.
pub(super) fn print_table(rows: &Value, columns: &[(&str, &str)]) {
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            columns
                .iter()
                .map(|(_, field)| cell(&row[*field]))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, (heading, _))| {
            rows.iter()
                .map(|row| row[index].chars().count())
                .chain([heading.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (index, text) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                out.push_str(text);
            } else {
                let pad = widths[index].saturating_sub(text.chars().count());
                out.push_str(text);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|(heading, _)| *heading).collect())
    );
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

/// Prints one object as `field: value` lines, in the order the server sent them, nested values as JSON.
pub(super) fn print_fields(value: &Value) {
    let Some(object) = value.as_object() else {
        print_json(value);
        return;
    };
    let width = object.keys().map(|key| key.len()).max().unwrap_or(0);
    for (key, field) in object {
        let shown = match field {
            Value::Object(_) | Value::Array(_) => field.to_string(),
            other => cell(other),
        };
        println!("{key:<width$}  {shown}");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ids_that_could_leave_their_path_segment_are_refused() {
        assert!(path_segment("0193a6c2-7d4e-7c3a-9c1e-1f2a3b4c5d6e").is_ok());
        for hostile in ["", "..", "a/b", "a%2Fb", "a?b", "a b"] {
            assert!(path_segment(hostile).is_err(), "{hostile:?}");
        }
    }

    #[test]
    fn cells_escape_control_characters() {
        assert_eq!(cell(&json!("plain")), "plain");
        assert_eq!(cell(&json!("a\u{1b}[2Jb")), "a\\u{1b}[2Jb");
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!(3)), "3");
    }
}
