//! Validation of a model's tool call before anything runs.
//!
//! The checks run in a fixed order, and the first failure wins:
//!
//! 1. the tool is registered ([`ValidationError::UnknownTool`]);
//! 2. `arguments` is one well-formed JSON value without duplicate keys
//!    ([`ValidationError::MalformedArguments`]);
//! 3. the value satisfies the tool's JSON Schema
//!    ([`ValidationError::SchemaViolation`], every violation listed);
//! 4. the raw payload is within the size limit
//!    ([`ValidationError::PayloadTooLarge`]).
//!
//! Every error names the field and the rule, and its `Display` text is
//! written for a model to read and correct its call.

use serde::Serialize;

/// One way the arguments break the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer to the offending field (`/language`), or to the missing
    /// or unexpected property for `required` and `additionalProperties`.
    pub field: String,
    /// The JSON Schema keyword that failed (`enum`, `type`, `required`, ...).
    pub rule: String,
    /// What is wrong, in words.
    pub message: String,
}

/// Why a tool call was rejected before execution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValidationError {
    /// No tool of that name is registered.
    #[error("{}", unknown_tool_text(.name, .available, .suggestion.as_deref()))]
    UnknownTool {
        /// The name the model used.
        name: String,
        /// Every registered name, sorted.
        available: Vec<String>,
        /// The closest registered name, if any is close.
        suggestion: Option<String>,
    },
    /// `arguments` is not one well-formed JSON value.
    #[error("arguments for `{tool}` are not valid JSON: {reason} (line {line}, column {column}). Send the arguments as a single JSON object, for example {{\"path\": \"notes.txt\"}}.")]
    MalformedArguments {
        /// The tool.
        tool: String,
        /// What the parser found.
        reason: String,
        /// 1-based line in the arguments string.
        line: usize,
        /// 1-based column in the arguments string.
        column: usize,
    },
    /// The arguments break the tool's schema.
    #[error("{}", schema_violation_text(.tool, .violations))]
    SchemaViolation {
        /// The tool.
        tool: String,
        /// Every violation found.
        violations: Vec<Violation>,
    },
    /// The raw arguments string is over the size limit.
    #[error("arguments for `{tool}` are {size} bytes, over the limit of {limit} bytes. Send less data in one call, for example by writing a file in parts.")]
    PayloadTooLarge {
        /// The tool.
        tool: String,
        /// Size of the raw arguments string.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

impl ValidationError {
    /// A short machine name for the class of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ValidationError::UnknownTool { .. } => "unknown_tool",
            ValidationError::MalformedArguments { .. } => "malformed_arguments",
            ValidationError::SchemaViolation { .. } => "schema_violation",
            ValidationError::PayloadTooLarge { .. } => "payload_too_large",
        }
    }
}

fn unknown_tool_text(name: &str, available: &[String], suggestion: Option<&str>) -> String {
    let mut text = format!("unknown tool `{name}`.");
    if let Some(suggestion) = suggestion {
        text.push_str(&format!(" Did you mean `{suggestion}`?"));
    }
    if available.is_empty() {
        text.push_str(" No tools are available.");
    } else {
        text.push_str(&format!(" Available tools: {}.", available.join(", ")));
    }
    text
}

fn schema_violation_text(tool: &str, violations: &[Violation]) -> String {
    let mut text = format!("arguments for `{tool}` do not match its schema:");
    for v in violations {
        text.push_str(&format!(
            "\n- {}: {} (rule: {})",
            field_label(&v.field),
            v.message,
            v.rule
        ));
    }
    text
}

fn field_label(pointer: &str) -> String {
    if pointer.is_empty() {
        "the arguments object".to_string()
    } else {
        format!("`{pointer}`")
    }
}

/// Turns one `jsonschema` error into a [`Violation`].
pub(crate) fn violation_from(error: &jsonschema::ValidationError<'_>) -> Violation {
    use jsonschema::error::ValidationErrorKind as Kind;
    let base = error.instance_path().as_str().to_string();
    let rule = error.kind().keyword().to_string();
    let (field, message) = match error.kind() {
        Kind::Required { property } => {
            let name = property
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| property.to_string());
            (
                format!("{base}/{}", escape_pointer(&name)),
                format!("required property `{name}` is missing"),
            )
        }
        Kind::AdditionalProperties { unexpected } => {
            let names: Vec<String> = unexpected.iter().map(|n| format!("`{n}`")).collect();
            let field = match unexpected.as_slice() {
                [only] => format!("{base}/{}", escape_pointer(only)),
                _ => base,
            };
            (
                field,
                format!(
                    "unexpected propert{} {}; only the properties in the schema are allowed",
                    if names.len() == 1 { "y" } else { "ies" },
                    names.join(", ")
                ),
            )
        }
        _ => (base, error.to_string()),
    };
    Violation {
        field,
        rule,
        message,
    }
}

fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The registered name closest to `name` by edit distance, if close enough.
pub(crate) fn closest_name<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<String> {
    let limit = (name.len() / 3).max(2);
    candidates
        .map(|candidate| (levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, candidate)| candidate.to_string())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_near_names_only() {
        let names = ["read_file", "write_file", "list_dir"];
        assert_eq!(
            closest_name("read_fil", names.iter().copied()).as_deref(),
            Some("read_file")
        );
        assert_eq!(
            closest_name("readfile", names.iter().copied()).as_deref(),
            Some("read_file")
        );
        assert_eq!(closest_name("launch_missiles", names.iter().copied()), None);
    }
}
