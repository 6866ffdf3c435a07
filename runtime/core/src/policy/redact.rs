//! Masking secrets in tool output before the model, the transcript or the
//! audit log sees it.

use regex::Regex;

use stack_types::outcome::ToolOutcome;

/// The built-in patterns: private keys, cloud keys, common API tokens.
pub const BUILTIN_PATTERNS: &[(&str, &str)] = &[
    (
        "private-key",
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
    ),
    ("aws-access-key-id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    (
        "aws-secret-access-key",
        r#"(?i)aws_secret_access_key\s*[=:]\s*["']?[A-Za-z0-9/+=]{40}"#,
    ),
    (
        "github-token",
        r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}\b",
    ),
    ("openai-key", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    ("anthropic-key", r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
    ("slack-token", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    ("google-api-key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("stripe-key", r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}"),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    ),
    ("bearer-token", r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{20,}=*"),
    (
        "password-assignment",
        r#"(?i)\b(?:password|passwd|secret|api_key|apikey|token)\s*[=:]\s*["']?[^\s"']{8,}"#,
    ),
];

/// A compiled set of secret patterns. The default masks nothing; a
/// policy's redactor comes from [`Policy::resolve`](crate::policy::Policy).
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    patterns: Vec<(String, Regex)>,
}

impl Redactor {
    /// Builds a redactor from the built-in set (when `builtin`) and extra
    /// `(name, regex)` patterns.
    pub fn new(builtin: bool, extra: &[(String, String)]) -> Result<Redactor, String> {
        let mut patterns = Vec::new();
        let builtins = BUILTIN_PATTERNS
            .iter()
            .filter(|_| builtin)
            .map(|(n, r)| (n.to_string(), r.to_string()));
        for (name, pattern) in builtins.chain(extra.iter().cloned()) {
            let regex = regex::RegexBuilder::new(&pattern)
                .size_limit(1 << 22)
                .build()
                .map_err(|e| format!("redaction pattern `{name}`: {e}"))?;
            patterns.push((name, regex));
        }
        Ok(Redactor { patterns })
    }

    /// These patterns, then `other`'s that have other names.
    pub fn merged(&self, other: &Redactor) -> Redactor {
        let mut patterns = self.patterns.clone();
        for (name, regex) in &other.patterns {
            if !patterns.iter().any(|(known, _)| known == name) {
                patterns.push((name.clone(), regex.clone()));
            }
        }
        Redactor { patterns }
    }

    /// `text` with every match replaced by `[REDACTED:name]`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (name, regex) in &self.patterns {
            if regex.is_match(&text) {
                text = regex
                    .replace_all(&text, format!("[REDACTED:{name}]").as_str())
                    .into_owned();
            }
        }
        text
    }

    /// Redacts stdout, stderr and the error of an outcome in place.
    pub fn redact_outcome(&self, outcome: &mut ToolOutcome) {
        outcome.stdout = self.redact(&outcome.stdout);
        outcome.stderr = self.redact(&outcome.stderr);
        if let Some(error) = &outcome.error {
            outcome.error = Some(self.redact(error));
        }
    }
}
