//! The user's config file: named model profiles and MCP servers.
//!
//! `~/.config/stack-runtime/config.toml` (or `$XDG_CONFIG_HOME/…`, or a file
//! given with `--config`) holds profiles, each a local GGUF or a served
//! model. `agent --profile NAME` picks one; `default_profile` names the one
//! used without the flag. `[mcp_servers.NAME]` sections, written as in a
//! policy, add MCP servers to every session started from the CLI. Unknown
//! keys are refused with the file and line, as policy files are.
//!
//! ```toml
//! default_profile = "stack"
//!
//! [profiles.local]
//! model = "~/models/qwen2.5-coder-7b-instruct-q4_k_m.gguf"
//! gpu_layers = 99
//! ctx_size = 16384
//!
//! [profiles.stack]
//! url = "http://gpu-box:8000/v1"
//! model_name = "stack-2.9-32b"
//! api_key_env = "STACK_API_KEY"
//!
//! [mcp_servers.github]
//! url = "https://api.githubcopilot.com/mcp/"
//! bearer_token_env = "GITHUB_TOKEN"
//! decision = "ask"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Whether the REPL keeps transcripts (and with them KV state, history
    /// and the audit log): the answer to the question the first
    /// interactive start asks ([`record_transcript_consent`]). Unset: not
    /// asked yet. `agent run` and hosts follow the policy.
    pub keep_transcripts: Option<bool>,
    /// The profile used when none is named.
    pub default_profile: Option<String>,
    /// Named model profiles.
    #[serde(default)]
    pub profiles: BTreeMap<String, ModelProfile>,
    /// MCP servers whose tools join every session this user starts from the
    /// CLI (the REPL, `run`, `tool` and `mcp`), as the policy's own
    /// `[mcp_servers.NAME]` would (same settings, same checks); a server the
    /// policy names keeps the policy's section.
    #[serde(default)]
    pub mcp_servers: BTreeMap<String, stack_core::policy::McpServerSpec>,
}

/// One model: a local GGUF (`model`) or a served one (`url`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    /// A local GGUF file.
    pub model: Option<PathBuf>,
    /// Layers to offload to the GPU (local).
    pub gpu_layers: Option<u32>,
    /// Context size in tokens (local).
    pub ctx_size: Option<u32>,
    /// The API base of a served model, for example `http://host:8000/v1`.
    pub url: Option<String>,
    /// The served model's name (the server's first model when unset).
    pub model_name: Option<String>,
    /// The environment variable that holds the API key.
    pub api_key_env: Option<String>,
    /// A file whose first line is the API key.
    pub api_key_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust besides the public roots
    /// (a server behind an internal CA).
    pub ca_file: Option<PathBuf>,
    /// How tool calls travel: `auto`, `native` or `prompted`.
    pub tool_path: Option<stack_model::remote::ToolPath>,
    /// Ask for OpenAI `strict` function schemas.
    pub strict: Option<bool>,
    /// Whether the server constrains calls under `tool_choice: auto`:
    /// `auto` (vLLM and SGLang), `structural_tag` or `off`.
    pub call_constraint: Option<stack_model::remote::CallConstraint>,
}

/// A config file that cannot be used, with where.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The line, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// Where the user's config file is looked for.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".config")))
        .map(|dir| dir.join("stack-runtime").join("config.toml"))
}

/// Records the answer to "keep transcripts?" in the config file at `path`:
/// a `keep_transcripts` line put first (a top-level key must come before
/// any table), the rest of the file kept as it was. The file and its
/// folder are created private (0600, 0700) when missing.
pub fn record_transcript_consent(path: &Path, keep: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    // Through a symlink (a dotfiles checkout) to the file it names, which
    // keeps its mode.
    let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o777);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err),
    };
    let text = format!(
        "# Asked once by the first interactive start: keep REPL transcripts (with KV state,\n# history and the audit log) on this machine. Change it here at any time.\nkeep_transcripts = {keep}\n{existing}"
    );
    let temporary = path.with_extension("toml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod consent_tests {
    use super::*;

    /// `[mcp_servers.NAME]` in the config file is checked as a policy's
    /// section is, and a bad one is refused with its line.
    #[test]
    fn mcp_servers_in_the_config_file_are_checked_with_their_line() {
        let path = Path::new("config.toml");
        let good = UserConfig::parse(
            "[mcp_servers.docs]\nurl = \"https://mcp.example.com/mcp\"\nbearer_token_env = \"DOCS_TOKEN\"\n\n[mcp_servers.files]\ncommand = \"mcp-files\"\nargs = [\"--root\", \".\"]\n",
            path,
        )
        .expect("parses");
        assert_eq!(good.mcp_servers.len(), 2);
        let bad = UserConfig::parse(
            "default_profile = \"x\"\n[profiles.x]\nmodel = \"/m.gguf\"\n\n[mcp_servers.far]\nurl = \"http://203.0.113.9/mcp\"\n",
            path,
        )
        .expect_err("plaintext to another machine");
        assert_eq!(bad.line, Some(5), "{bad}");
        assert!(bad.message.contains("plaintext"), "{bad}");
    }

    #[test]
    fn a_recorded_consent_reads_back_with_the_profiles_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "default_profile = \"local\"\n[profiles.local]\nmodel = \"/m.gguf\"\n",
        )
        .expect("write");
        record_transcript_consent(&path, false).expect("record");
        let config = UserConfig::load(&path, false).expect("parses");
        assert_eq!(config.keep_transcripts, Some(false));
        assert_eq!(config.default_profile.as_deref(), Some("local"));
        // A missing file is made, private.
        let fresh = dir.path().join("new/config.toml");
        record_transcript_consent(&fresh, true).expect("record");
        assert_eq!(
            UserConfig::load(&fresh, false)
                .expect("parses")
                .keep_transcripts,
            Some(true)
        );
    }
}

impl UserConfig {
    /// Parses `text` (from `path`, for errors).
    pub fn parse(text: &str, path: &Path) -> Result<UserConfig, ConfigError> {
        let config: UserConfig =
            toml::from_str(text).map_err(|err: toml::de::Error| ConfigError {
                path: path.to_path_buf(),
                line: err
                    .span()
                    .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
                message: err.message().to_string(),
            })?;
        for (name, profile) in &config.profiles {
            if profile.model.is_some() && profile.url.is_some() {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line: line_of(text, &format!("[profiles.{name}]")),
                    message: format!(
                        "profile `{name}` sets both `model` (a local GGUF) and `url` (a served model); pick one"
                    ),
                });
            }
        }
        for (name, server) in &config.mcp_servers {
            let checked =
                stack_core::policy::check_mcp_server_name(name).and_then(|()| server.check(name));
            if let Err(message) = checked {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line: line_of(text, &format!("[mcp_servers.{name}]")),
                    message,
                });
            }
        }
        if let Some(default) = &config.default_profile {
            if !config.profiles.contains_key(default) {
                return Err(ConfigError {
                    path: path.to_path_buf(),
                    line: line_of(text, "default_profile"),
                    message: format!("default_profile names `{default}`, which is not a profile"),
                });
            }
        }
        Ok(config)
    }

    /// Loads `path`; a missing file is an empty config only when
    /// `missing_ok` (the default location), an error otherwise.
    pub fn load(path: &Path, missing_ok: bool) -> Result<UserConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => UserConfig::parse(&text, path),
            Err(err) if missing_ok && err.kind() == std::io::ErrorKind::NotFound => {
                Ok(UserConfig::default())
            }
            Err(err) => Err(ConfigError {
                path: path.to_path_buf(),
                line: None,
                message: format!("cannot read: {err}"),
            }),
        }
    }

    /// The profile called `name`, or the default one when `name` is `None`.
    pub fn profile(&self, name: Option<&str>) -> Result<Option<&ModelProfile>, String> {
        match name.or(self.default_profile.as_deref()) {
            None => Ok(None),
            Some(name) => self.profiles.get(name).map(Some).ok_or_else(|| {
                let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
                format!(
                    "no profile `{name}` in the config file (profiles: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }),
        }
    }
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.trim_start().starts_with(needle))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_mistakes_name_their_line() {
        let text = "default_profile = \"stack\"\n\n[profiles.stack]\nurl = \"http://h:8000/v1\"\nmodel_name = \"m\"\napi_key_env = \"K\"\ntool_path = \"native\"\n";
        let config = UserConfig::parse(text, Path::new("c.toml")).expect("valid");
        let stack = config.profile(None).expect("known").expect("default");
        assert_eq!(stack.url.as_deref(), Some("http://h:8000/v1"));
        assert_eq!(stack.tool_path, Some(stack_model::remote::ToolPath::Native));
        let typo = "[profiles.x]\nurl = \"http://h/v1\"\nmodle_name = \"m\"\n";
        let err = UserConfig::parse(typo, Path::new("c.toml")).expect_err("unknown key");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(
            err.to_string()
                .starts_with("c.toml:3: unknown field `modle_name`"),
            "{err}"
        );
        let both = "[profiles.x]\nurl = \"http://h/v1\"\nmodel = \"a.gguf\"\n";
        assert_eq!(
            UserConfig::parse(both, Path::new("c.toml"))
                .expect_err("both")
                .line,
            Some(1)
        );
        let config =
            UserConfig::parse("[profiles.a]\nmodel = \"a.gguf\"\n", Path::new("c")).expect("valid");
        assert!(config
            .profile(Some("b"))
            .expect_err("unknown")
            .contains("profiles: a"));
    }
}
