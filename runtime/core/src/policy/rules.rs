//! Argument rules: a JSON pointer into the *parsed* arguments, a matcher
//! (prefix, regex or glob) and a decision with its reason.
//!
//! Rules never see the raw argument string, so JSON escapes (`\u002e`),
//! duplicate keys (refused at validation) or re-ordering cannot dodge them.
//! `path = true` normalizes the value lexically first (`./`, `//`, `a/..`),
//! and the pointer `""` matches every string anywhere in the arguments, so a
//! value cannot hide in a nested or unexpected field.

use serde::Deserialize;
use serde_json::Value;

use super::file::Verdict;

/// An argument rule as written in a policy file (`[[rules]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Tool name, or `*` for every tool.
    #[serde(default = "any_tool")]
    pub tool: String,
    /// JSON pointer to the argument (`/path`); `""` means any string anywhere.
    pub pointer: String,
    /// Match when the value starts with this.
    pub prefix: Option<String>,
    /// Match when this regular expression finds a match in the value.
    pub regex: Option<String>,
    /// Match when the value matches this glob (`*` does not cross `/`).
    pub glob: Option<String>,
    /// Normalize the value as a path before matching.
    #[serde(default)]
    pub path: bool,
    /// Ignore case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// What a match decides.
    pub decision: Verdict,
    /// Why; shown to the model and the user.
    pub reason: String,
}

fn any_tool() -> String {
    "*".to_string()
}

#[derive(Debug, Clone)]
enum Matcher {
    Prefix(String),
    Regex(regex::Regex),
    Glob(globset::GlobMatcher),
}

/// A compiled argument rule.
#[derive(Debug, Clone)]
pub struct ArgRule {
    /// The rule as written.
    pub spec: RuleSpec,
    /// Its position, for naming it (`rules[3]`).
    pub index: usize,
    matcher: Matcher,
}

impl ArgRule {
    /// Compiles a rule; the error says what is wrong with it.
    pub fn compile(spec: RuleSpec, index: usize) -> Result<ArgRule, String> {
        if !spec.pointer.is_empty() && !spec.pointer.starts_with('/') {
            return Err(format!(
                "pointer `{}` must be empty or start with `/`",
                spec.pointer
            ));
        }
        let matcher = match (&spec.prefix, &spec.regex, &spec.glob) {
            (Some(prefix), None, None) => Matcher::Prefix(if spec.case_insensitive {
                prefix.to_lowercase()
            } else {
                prefix.clone()
            }),
            (None, Some(pattern), None) => Matcher::Regex(
                regex::RegexBuilder::new(pattern)
                    .case_insensitive(spec.case_insensitive)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("bad regex: {e}"))?,
            ),
            (None, None, Some(glob)) => Matcher::Glob(
                globset::GlobBuilder::new(glob)
                    .literal_separator(true)
                    .case_insensitive(spec.case_insensitive)
                    .build()
                    .map_err(|e| format!("bad glob: {e}"))?
                    .compile_matcher(),
            ),
            _ => return Err("give exactly one of `prefix`, `regex` or `glob`".to_string()),
        };
        Ok(ArgRule {
            spec,
            index,
            matcher,
        })
    }

    /// A name for the rule in decisions and the audit log.
    pub fn name(&self) -> String {
        format!("rules[{}]", self.index)
    }

    /// Whether the rule applies to `tool`.
    pub fn applies_to(&self, tool: &str) -> bool {
        self.spec.tool == "*" || self.spec.tool == tool
    }

    /// Whether the rule matches the parsed arguments.
    pub fn matches(&self, arguments: &Value) -> bool {
        let mut values = Vec::new();
        if self.spec.pointer.is_empty() {
            collect_strings(arguments, &mut values);
        } else if let Some(value) = arguments.pointer(&self.spec.pointer) {
            match value {
                Value::Array(items) => items.iter().for_each(|item| scalar_text(item, &mut values)),
                other => scalar_text(other, &mut values),
            }
        }
        values.iter().any(|value| self.matches_text(value))
    }

    fn matches_text(&self, value: &str) -> bool {
        let value = if self.spec.path {
            normalize_path(value)
        } else {
            value.to_string()
        };
        match &self.matcher {
            Matcher::Prefix(prefix) if self.spec.case_insensitive => {
                value.to_lowercase().starts_with(prefix)
            }
            Matcher::Prefix(prefix) => value.starts_with(prefix),
            Matcher::Regex(regex) => regex.is_match(&value),
            Matcher::Glob(glob) => glob.is_match(&value),
        }
    }
}

fn scalar_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Bool(b) => out.push(b.to_string()),
        _ => {}
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| collect_strings(item, out)),
        Value::Object(map) => map.values().for_each(|item| collect_strings(item, out)),
        other => scalar_text(other, out),
    }
}

/// Lexical path normalization: drops `.` and empty segments, resolves `..`
/// against earlier segments, keeps a leading `/`.
pub fn normalize_path(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if matches!(parts.last(), Some(last) if *last != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if absolute {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_path;

    #[test]
    fn paths_normalize_lexically() {
        for (input, expected) in [
            ("./.git/config", ".git/config"),
            (".git//config", ".git/config"),
            ("a/../.git/config", ".git/config"),
            ("/etc/../etc/./shadow", "/etc/shadow"),
            ("../../x", "../../x"),
            ("/../etc", "/etc"),
            ("", "."),
        ] {
            assert_eq!(normalize_path(input), expected, "{input}");
        }
    }
}
