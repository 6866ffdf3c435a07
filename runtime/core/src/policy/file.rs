//! Policy files: parsing (unknown keys rejected with file:line) and layering.
//!
//! A file is parsed into a [`PolicyFile`], where every setting is optional.
//! `extends = "NAME"` names a preset (`default`, `strict`, `trusted`) or a
//! path relative to the file; the chain is resolved base first, then each
//! file's settings replace the base's, tables merging key by key, and
//! argument rules and redaction patterns adding to the base's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::rules::RuleSpec;
use stack_sandbox::process::ProtectedMode;

/// A decision for a tool call.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Run it.
    Allow,
    /// Ask the approval handler first.
    Ask,
    /// Refuse.
    Deny,
}

impl Verdict {
    /// `allow`, `ask` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Ask => "ask",
            Verdict::Deny => "deny",
        }
    }
}

/// One policy file as written: every setting optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The preset or file this one layers over.
    pub extends: Option<String>,
    /// A short description shown by `/policy` and `agent policy check`.
    pub description: Option<String>,
    /// Settings for tools not named under `[tools]`.
    pub defaults: Option<ToolSettings>,
    /// Per-tool settings.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolSettings>,
    /// Argument rules.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Sandbox settings: defaults, then per language, then per tool.
    pub sandbox: Option<SandboxSection>,
    /// Session budgets.
    pub budgets: Option<BudgetSettings>,
    /// Secret masking.
    pub redaction: Option<RedactionSettings>,
    /// Transcript keeping.
    pub privacy: Option<PrivacySettings>,
    /// MCP servers whose tools join the registry as `NAME__tool`, each run
    /// in the process sandbox. A file's server replaces a same-named one of
    /// the file it extends.
    #[serde(default)]
    pub mcp_servers: BTreeMap<String, McpServerSpec>,
}

/// `[mcp_servers.NAME]`: an MCP server, and the decisions for its tools.
/// Either a `command`, run over stdio inside the process sandbox, or the
/// `url` of a Streamable HTTP server that runs elsewhere (the runtime only
/// connects to it; the sandbox settings below are for stdio servers).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct McpServerSpec {
    /// The program (a path, or a name looked up on `PATH`) of a stdio
    /// server.
    #[serde(default)]
    pub command: String,
    /// The endpoint of a Streamable HTTP server: `https://…`, or `http://`
    /// on a loopback address only.
    pub url: Option<String>,
    /// The environment variable that holds the bearer token sent to an
    /// HTTP server (`Authorization: Bearer …`); the token itself is never
    /// written in a policy.
    pub bearer_token_env: Option<String>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Names of the runtime's environment variables passed through; no
    /// other variable reaches the server.
    #[serde(default)]
    pub env: Vec<String>,
    /// Paths the server may read besides the system folders and the
    /// workspace: its own install (a virtual environment, `node_modules`).
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
    /// Network reach (default `none`).
    pub network: Option<Network>,
    /// The decision for its tools not named under `tools` (default: the
    /// policy's `[defaults]`).
    pub decision: Option<Verdict>,
    /// Why, for that decision.
    pub reason: Option<String>,
    /// Per-tool decisions, by the server's own tool name.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolSettings>,
    /// Per-call timeout in milliseconds (default 60000); past it the call
    /// is cancelled (`notifications/cancelled`) and reported as timed out.
    pub timeout_ms: Option<u64>,
    /// Memory for the server and its children, in MiB (default: the
    /// policy's `[sandbox]`).
    pub memory_mb: Option<u64>,
    /// CPU seconds over the server's whole life (default 600).
    pub cpu_seconds: Option<u64>,
    /// Processes (default: the policy's `[sandbox]`).
    pub processes: Option<u64>,
}

/// How the runtime reaches an MCP server (see [`McpServerSpec::endpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpEndpoint<'a> {
    /// A program run over stdio in the process sandbox.
    Stdio {
        /// The program.
        command: &'a str,
        /// Its arguments.
        args: &'a [String],
    },
    /// A Streamable HTTP server.
    Http {
        /// Its endpoint.
        url: &'a str,
        /// The variable holding its bearer token, if it wants one.
        bearer_token_env: Option<&'a str>,
    },
}

impl McpServerSpec {
    /// How the runtime reaches the server (a checked policy names exactly
    /// one of `command` and `url`).
    pub fn endpoint(&self) -> McpEndpoint<'_> {
        match &self.url {
            Some(url) => McpEndpoint::Http {
                url,
                bearer_token_env: self.bearer_token_env.as_deref(),
            },
            None => McpEndpoint::Stdio {
                command: &self.command,
                args: &self.args,
            },
        }
    }

    /// Why this section cannot be used as written, if it cannot: exactly
    /// one of `command` and `url`; an HTTP server's URL is `https://`, or
    /// `http://` on this machine only (a token or tool data never crosses
    /// a network in plaintext), carries no credentials, and takes none of
    /// the sandbox settings, which are for a stdio server that runs here.
    pub fn check(&self, name: &str) -> Result<(), String> {
        let section = format!("[mcp_servers.{name}]");
        let Some(url) = &self.url else {
            if self.command.trim().is_empty() {
                return Err(format!("{section}: give a `command` (a stdio server, run in the sandbox) or a `url` (a Streamable HTTP server)"));
            }
            if self.bearer_token_env.is_some() {
                return Err(format!("{section}: `bearer_token_env` is for a server given by `url`; a stdio server gets variables through `env`"));
            }
            return Ok(());
        };
        if !self.command.is_empty() {
            return Err(format!(
                "{section}: give either `command` (a stdio server) or `url` (an HTTP server), not both"
            ));
        }
        let stdio_only = [
            ("args", !self.args.is_empty()),
            ("env", !self.env.is_empty()),
            ("read_only", !self.read_only.is_empty()),
            ("network", self.network.is_some()),
            ("memory_mb", self.memory_mb.is_some()),
            ("cpu_seconds", self.cpu_seconds.is_some()),
            ("processes", self.processes.is_some()),
        ];
        if let Some((field, _)) = stdio_only.iter().find(|(_, set)| *set) {
            return Err(format!("{section}: `{field}` is a setting of a stdio server, which runs in the sandbox here; a server given by `url` runs elsewhere"));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{section}: `url` {url:?} is not an http:// or https:// URL"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(format!("{section}: `url` carries credentials; name a variable in `bearer_token_env` instead"));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority
                .rsplit_once(':')
                .map_or(authority, |(host, _)| host),
        };
        if host.is_empty() {
            return Err(format!("{section}: `url` {url:?} names no host"));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "https" => {}
            "http" if is_loopback_host(host) => {}
            "http" => {
                return Err(format!("{section}: `url` is plain http:// to {host}, which is not this machine: tool calls (and a token) would cross the network in plaintext; use https://"))
            }
            other => {
                return Err(format!(
                    "{section}: `url` has the scheme {other:?}; an MCP server is reached over http:// or https://"
                ))
            }
        }
        if let Some(var) = &self.bearer_token_env {
            let valid = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "{section}: `bearer_token_env` {var:?} is not an environment variable name"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `host` (from a URL, without brackets) is this machine.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Decision settings for a tool (or the default for all tools).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ToolSettings {
    /// allow, ask or deny.
    pub decision: Option<Verdict>,
    /// Why, shown to the model and the user when it denies or asks.
    pub reason: Option<String>,
}

/// Which sandbox runs code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// wasmtime.
    Wasi,
    /// The process sandbox.
    Process,
}

/// Network reach, as written in a policy: `"none"`, `"loopback"`,
/// `"full"`, or an allowlist table.
pub use stack_sandbox::process::Network;

/// Sandbox settings; every field optional so layers can merge.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// `wasi` or `process`.
    pub backend: Option<Backend>,
    /// Wall-clock timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Memory in MiB (cgroup for processes, `StoreLimits` for WASI).
    pub memory_mb: Option<u64>,
    /// CPU seconds.
    pub cpu_seconds: Option<u64>,
    /// Process count.
    pub processes: Option<u64>,
    /// Cap on stdout and on stderr, each, in bytes.
    pub output_bytes: Option<usize>,
    /// Largest file a call may write, in MiB.
    pub file_size_mb: Option<u64>,
    /// What one call may add to the workspace and its tmp, in MiB (the
    /// process sandbox's disk budget; `0` turns the budget off and lets
    /// calls write to the workspace directly, unbounded).
    pub disk_mb: Option<u64>,
    /// How many names (files, folders, links) one call may add to the
    /// workspace and its tmp.
    pub max_files: Option<u64>,
    /// Extra read-only paths.
    pub read_only_paths: Option<Vec<PathBuf>>,
    /// `none`, `loopback`, `full`, or `{ allow = [...], deny = [...] }`
    /// (egress by name through the runtime's proxy).
    pub network: Option<Network>,
    /// Keep a live interpreter between calls (WASI).
    pub stateful: Option<bool>,
    /// Workspace paths (relative) that sandboxed code may read but not
    /// change; replaces the default list (`.git`, `.envrc`, `.vscode`, …).
    pub read_only_in_workspace: Option<Vec<PathBuf>>,
    /// Workspace paths (relative) that sandboxed code may not see;
    /// replaces the default list (`.env`, `.ssh`, …).
    pub hidden_in_workspace: Option<Vec<PathBuf>>,
}

impl SandboxSettings {
    /// `over`'s fields replace `self`'s where set.
    pub fn layered(&self, over: &SandboxSettings) -> SandboxSettings {
        SandboxSettings {
            backend: over.backend.or(self.backend),
            timeout_ms: over.timeout_ms.or(self.timeout_ms),
            memory_mb: over.memory_mb.or(self.memory_mb),
            cpu_seconds: over.cpu_seconds.or(self.cpu_seconds),
            processes: over.processes.or(self.processes),
            output_bytes: over.output_bytes.or(self.output_bytes),
            file_size_mb: over.file_size_mb.or(self.file_size_mb),
            disk_mb: over.disk_mb.or(self.disk_mb),
            max_files: over.max_files.or(self.max_files),
            read_only_paths: over
                .read_only_paths
                .clone()
                .or_else(|| self.read_only_paths.clone()),
            // An allowlist over an allowlist narrows it; anything else
            // replaces.
            network: match (&self.network, &over.network) {
                (Some(base), Some(over)) => Some(base.layered(over)),
                (base, over) => over.clone().or_else(|| base.clone()),
            },
            stateful: over.stateful.or(self.stateful),
            read_only_in_workspace: over
                .read_only_in_workspace
                .clone()
                .or_else(|| self.read_only_in_workspace.clone()),
            hidden_in_workspace: over
                .hidden_in_workspace
                .clone()
                .or_else(|| self.hidden_in_workspace.clone()),
        }
    }
}

impl SandboxSettings {
    /// These settings, no looser than `outer` (see
    /// [`Policy::within`](super::Policy::within)): each limit the smaller
    /// of the two (an unset one counts as the smaller of the sandboxes'
    /// defaults, so setting a limit above the default never loosens an
    /// unset one), the narrower network, the union of the protected
    /// workspace paths, a live interpreter only when both allow one, and
    /// `outer`'s backend and extra read-only paths.
    pub fn within(&self, outer: &SandboxSettings) -> SandboxSettings {
        let defaults = stack_sandbox::process::ResourceLimits::default();
        #[cfg(feature = "wasi")]
        let memory_default = (defaults.memory_bytes >> 20)
            .min((stack_sandbox::wasi::WasiPolicy::default().memory_bytes >> 20) as u64);
        #[cfg(not(feature = "wasi"))]
        let memory_default = defaults.memory_bytes >> 20;
        let state_folders: Vec<PathBuf> = stack_sandbox::process::runtime_state_folders()
            .into_iter()
            .map(|(folder, _)| folder)
            .collect();
        let disk_default = stack_sandbox::process::DiskBudget::default();
        // A disk budget of 0 is no budget at all: the loosest, not the
        // tightest. Within a bounded outer one it takes the outer bound.
        fn tight_budget(a: Option<u64>, b: Option<u64>, default: u64) -> Option<u64> {
            let bound = |v: Option<u64>| match v {
                Some(0) => None,
                Some(v) => Some(v),
                None => Some(default),
            };
            match (a, b) {
                (None, None) => None,
                _ => match (bound(a), bound(b)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (Some(one), None) | (None, Some(one)) => Some(one),
                    (None, None) => Some(0),
                },
            }
        }
        fn tight<T: Ord + Copy>(a: Option<T>, b: Option<T>, default: T) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (Some(one), None) | (None, Some(one)) => Some(one.min(default)),
                (None, None) => None,
            }
        }
        let network = match (&self.network, &outer.network) {
            (Some(inner), Some(outer)) => Some(inner.within(outer)),
            // Unset means none.
            _ => None,
        };
        let protected = |mode: ProtectedMode| -> Vec<PathBuf> {
            let mut union: Vec<PathBuf> = Vec::new();
            for settings in [self, outer] {
                for (path, found) in stack_sandbox::process::protected_list(
                    settings.read_only_in_workspace.as_deref(),
                    settings.hidden_in_workspace.as_deref(),
                ) {
                    // The runtime's own state folders are always
                    // protected (the list adds them itself).
                    if found == mode && !state_folders.contains(&path) && !union.contains(&path) {
                        union.push(path);
                    }
                }
            }
            union
        };
        let hidden = protected(ProtectedMode::Hidden);
        let read_only = protected(ProtectedMode::ReadOnly)
            .into_iter()
            .filter(|path| !hidden.contains(path))
            .collect();
        SandboxSettings {
            backend: outer.backend,
            timeout_ms: tight(self.timeout_ms, outer.timeout_ms, defaults.wall_ms),
            memory_mb: tight(self.memory_mb, outer.memory_mb, memory_default),
            cpu_seconds: tight(self.cpu_seconds, outer.cpu_seconds, defaults.cpu_seconds),
            processes: tight(self.processes, outer.processes, defaults.processes),
            output_bytes: tight(self.output_bytes, outer.output_bytes, defaults.output_bytes),
            file_size_mb: tight(
                self.file_size_mb,
                outer.file_size_mb,
                defaults.file_size_bytes >> 20,
            ),
            disk_mb: tight_budget(self.disk_mb, outer.disk_mb, disk_default.bytes >> 20),
            max_files: tight_budget(self.max_files, outer.max_files, disk_default.files),
            read_only_paths: outer.read_only_paths.clone(),
            network,
            stateful: match (self.stateful, outer.stateful) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            read_only_in_workspace: Some(read_only),
            hidden_in_workspace: Some(hidden),
        }
    }
}

/// `[sandbox]`: defaults, `[sandbox.languages.python]`, `[sandbox.tools.NAME]`.
///
/// The default fields are spelled out (not flattened) so that unknown keys
/// are still rejected.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSection {
    /// See [`SandboxSettings::backend`].
    pub backend: Option<Backend>,
    /// See [`SandboxSettings::timeout_ms`].
    pub timeout_ms: Option<u64>,
    /// See [`SandboxSettings::memory_mb`].
    pub memory_mb: Option<u64>,
    /// See [`SandboxSettings::cpu_seconds`].
    pub cpu_seconds: Option<u64>,
    /// See [`SandboxSettings::processes`].
    pub processes: Option<u64>,
    /// See [`SandboxSettings::output_bytes`].
    pub output_bytes: Option<usize>,
    /// See [`SandboxSettings::file_size_mb`].
    pub file_size_mb: Option<u64>,
    /// See [`SandboxSettings::disk_mb`].
    pub disk_mb: Option<u64>,
    /// See [`SandboxSettings::max_files`].
    pub max_files: Option<u64>,
    /// See [`SandboxSettings::read_only_paths`].
    pub read_only_paths: Option<Vec<PathBuf>>,
    /// See [`SandboxSettings::network`].
    pub network: Option<Network>,
    /// See [`SandboxSettings::stateful`].
    pub stateful: Option<bool>,
    /// See [`SandboxSettings::read_only_in_workspace`].
    pub read_only_in_workspace: Option<Vec<PathBuf>>,
    /// See [`SandboxSettings::hidden_in_workspace`].
    pub hidden_in_workspace: Option<Vec<PathBuf>>,
    /// Per language of `execute_code`.
    #[serde(default)]
    pub languages: BTreeMap<String, SandboxSettings>,
    /// Per tool.
    #[serde(default)]
    pub tools: BTreeMap<String, SandboxSettings>,
}

impl SandboxSection {
    /// The section's own defaults.
    pub fn defaults(&self) -> SandboxSettings {
        SandboxSettings {
            backend: self.backend,
            timeout_ms: self.timeout_ms,
            memory_mb: self.memory_mb,
            cpu_seconds: self.cpu_seconds,
            processes: self.processes,
            output_bytes: self.output_bytes,
            file_size_mb: self.file_size_mb,
            disk_mb: self.disk_mb,
            max_files: self.max_files,
            read_only_paths: self.read_only_paths.clone(),
            network: self.network.clone(),
            stateful: self.stateful,
            read_only_in_workspace: self.read_only_in_workspace.clone(),
            hidden_in_workspace: self.hidden_in_workspace.clone(),
        }
    }
}

/// `[budgets]`: what all of a session's calls may use together. A field
/// left out is unlimited, so a policy with no `[budgets]` has no session
/// budget (each call is still bounded by `[sandbox]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// Tool calls in one turn.
    pub calls_per_turn: Option<u64>,
    /// Tool calls in the session.
    pub calls_per_session: Option<u64>,
    /// Sandbox CPU seconds in the session.
    pub sandbox_cpu_seconds: Option<u64>,
    /// Sandbox wall-clock seconds in the session.
    pub sandbox_wall_seconds: Option<u64>,
    /// Bytes of one tool result fed back to the model.
    pub result_bytes_to_model: Option<usize>,
    /// Bytes of tool output fed back to the model in the session.
    pub output_bytes_to_model: Option<u64>,
    /// MiB the session's sandboxed calls may add to the workspace and
    /// their tmp, together (as each call's disk budget counts them; see
    /// `[sandbox] disk_mb`). Checked before each call: the last call may
    /// take the session past it by at most its own budget.
    pub disk_mb: Option<u64>,
    /// Names (files, folders, links) the session's sandboxed calls may
    /// add, together; checked like `disk_mb`.
    pub files: Option<u64>,
}

/// `[redaction]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionSettings {
    /// Whether the built-in secret patterns apply.
    pub builtin: Option<bool>,
    /// Extra patterns.
    #[serde(default)]
    pub patterns: Vec<PatternSpec>,
}

/// One redaction pattern.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    /// Name shown in the mask: `[REDACTED:name]`.
    pub name: String,
    /// Regular expression.
    pub regex: String,
}

/// `[privacy]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    /// Whether transcripts are written to disk.
    pub keep_transcripts: Option<bool>,
    /// Where (`~` is the home folder).
    pub transcript_dir: Option<String>,
    /// Whether the audit log is written.
    pub audit_log: Option<bool>,
    /// Days a session's transcript, KV state, consent record and history,
    /// and an audit record, are kept; older ones are purged when a runtime
    /// starts and once a day while one runs. Unset: kept until deleted.
    pub max_age_days: Option<u64>,
    /// Whether transcripts, KV state, REPL history and the audit log are
    /// encrypted at rest (AES-256-GCM records where the CPU has AES
    /// instructions, else XChaCha20-Poly1305; see `stack_seal`), with the
    /// key from the key file (`~/.config/stack-runtime/keys/current`,
    /// made 0600 on first use) or `STACK_RUNTIME_KEY`.
    pub encrypt: Option<bool>,
    /// Whether the audio of a spoken command is kept beside its session's
    /// transcript (`ID.audio`, as the 16 kHz mono PCM the model heard;
    /// sealed like the rest with `encrypt`). Unset or false: only the
    /// transcript text and the audio's sha256 are kept.
    pub keep_audio: Option<bool>,
}

/// A broken policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct PolicyError {
    /// The file (or `preset:NAME`).
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The presets shipped in `policies/`, compiled in.
pub const PRESETS: &[(&str, &str)] = &[
    ("default", include_str!("../../../../policies/default.toml")),
    ("strict", include_str!("../../../../policies/strict.toml")),
    ("trusted", include_str!("../../../../policies/trusted.toml")),
];

/// Parses one policy file's text.
pub fn parse(text: &str, path: &Path) -> Result<PolicyFile, PolicyError> {
    toml::from_str(text).map_err(|err: toml::de::Error| PolicyError {
        path: path.to_path_buf(),
        line: err
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
        message: err.message().to_string(),
    })
}

/// One file of an `extends` chain, with its text (for line numbers later).
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// Where it came from (`preset:NAME` for presets).
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// What it says.
    pub file: PolicyFile,
}

/// Loads `path` and every file it extends, base first.
pub fn load_chain(path: &Path) -> Result<Vec<LoadedFile>, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|err| PolicyError {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot read: {err}"),
    })?;
    chain_from_text(&text, path)
}

/// Parses `text` (named `origin`) and loads what it extends.
pub fn chain_from_text(text: &str, origin: &Path) -> Result<Vec<LoadedFile>, PolicyError> {
    let file = parse(text, origin)?;
    let mut chain = match &file.extends {
        None => Vec::new(),
        Some(base) => resolve_base(base, origin.parent().unwrap_or(Path::new(".")), origin, 0)?,
    };
    chain.push(LoadedFile {
        path: origin.to_path_buf(),
        text: text.to_string(),
        file,
    });
    Ok(chain)
}

/// Loads a preset by name, with what it extends.
pub fn load_preset(name: &str) -> Result<Vec<LoadedFile>, PolicyError> {
    resolve_base(name, Path::new("."), Path::new("<preset>"), 0)
}

fn resolve_base(
    base: &str,
    folder: &Path,
    from: &Path,
    depth: usize,
) -> Result<Vec<LoadedFile>, PolicyError> {
    let fail = |message: String| PolicyError {
        path: from.to_path_buf(),
        line: None,
        message,
    };
    if depth > 8 {
        return Err(fail(format!(
            "`extends` chain is too deep (a cycle through `{base}`?)"
        )));
    }
    let (text, path) =
        if let Some((_, text)) = PRESETS.iter().find(|(name, _)| *name == base) {
            (text.to_string(), PathBuf::from(format!("preset:{base}")))
        } else {
            let path = folder.join(base);
            let text =
                std::fs::read_to_string(&path).map_err(|err| {
                    fail(format!(
                "`extends = \"{base}\"` is neither a preset ({}) nor a readable file: {err}",
                PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
                })?;
            (text, path)
        };
    let file = parse(&text, &path)?;
    let mut chain = match &file.extends {
        None => Vec::new(),
        Some(next) => resolve_base(
            next,
            path.parent().unwrap_or(Path::new(".")),
            &path,
            depth + 1,
        )?,
    };
    chain.push(LoadedFile { path, text, file });
    Ok(chain)
}
