//! Safety policies: files and layering, rule types and precedence, hostile
//! argument encodings, budgets, redaction, approvals and the audit log.
//! Real policy files on disk, the real registry and the real gate. The
//! `agent policy` and `agent tool run` commands are tested in `tests/cli.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use stack_core::dispatch::ToolContext;
use stack_core::gate::Gate;
use stack_core::policy::{
    mcp_tool_name, process_policy, ApprovalAnswer, ApprovalRequest, AuditLog, Backend,
    ChannelApprover, Grants, Policy, Verdict,
};
use stack_core::tools::Registry;
use stack_core::workspace::Workspace;
use stack_sandbox::process::Network;
use stack_types::message::ToolCall;
use stack_types::outcome::Status;

fn policy_file(name: &str) -> PathBuf {
    common::fixture(&format!("policies/{name}"))
}

fn user_policy() -> Policy {
    Policy::load(&policy_file("user.toml")).expect("user policy loads")
}

fn decide(policy: &Policy, tool: &str, arguments: &str) -> (Verdict, String) {
    let registry = Registry::with_builtins();
    let call = registry
        .validate(&ToolCall::function("c", tool, arguments))
        .expect("valid call");
    let decision = policy.decide(tool, call.arguments(), &Grants::default());
    (decision.verdict, decision.rule)
}

#[test]
fn presets_load_and_say_who_they_are_for() {
    for name in ["default", "strict", "trusted"] {
        let policy = Policy::preset(name).expect(name);
        assert!(policy.description.is_some(), "{name}");
        let text =
            std::fs::read_to_string(common::repo_root().join(format!("policies/{name}.toml")))
                .expect("preset file");
        assert!(
            text.starts_with(&format!("# {name}: for ")),
            "{name} needs a header comment saying who it is for"
        );
    }
    let strict = Policy::preset("strict").expect("strict");
    assert_eq!(
        strict.sandbox_for("execute_code", Some("python")).backend,
        Some(Backend::Wasi)
    );
    assert_eq!(
        decide(&strict, "read_file", r#"{"path": "a"}"#).0,
        Verdict::Ask
    );
    let trusted = Policy::preset("trusted").expect("trusted");
    assert_eq!(
        decide(
            &trusted,
            "execute_code",
            r#"{"code": "1", "language": "python"}"#
        )
        .0,
        Verdict::Allow
    );
    assert_eq!(
        process_policy(&trusted.sandbox_for("execute_code", Some("python"))).network,
        Network::Loopback
    );
}

/// Broken files: name, expected line, and a piece of the message.
const BROKEN: &[(&str, Option<usize>, &str)] = &[
    ("bad_unknown_key.toml", Some(4), "unknown field `decison`"),
    (
        "bad_two_matchers.toml",
        Some(3),
        "exactly one of `prefix`, `regex` or `glob`",
    ),
    ("bad_regex.toml", Some(3), "bad regex"),
    ("bad_extends.toml", None, "neither a preset"),
    ("bad_verdict.toml", Some(2), "unknown variant `maybe`"),
    ("bad_cycle_a.toml", None, "too deep"),
    ("bad_language.toml", Some(1), "unknown language `cobol`"),
    ("bad_network.toml", Some(2), "invalid value: string \"internet\", expected \"none\", \"loopback\", \"full\", or an allowlist table"),
    ("bad_network_entry.toml", Some(2), "network entry `*`: a bare `*` would allow every host"),
    (
        "bad_pointer.toml",
        Some(1),
        "must be empty or start with `/`",
    ),
];

#[test]
fn broken_policy_files_are_rejected_with_file_and_line() {
    for (name, line, message) in BROKEN {
        let err = Policy::load(&policy_file(name)).expect_err(name);
        assert_eq!(err.line, *line, "{name}: {err}");
        assert!(err.to_string().contains(message), "{name}: {err}");
        assert!(
            err.path.to_string_lossy().contains("bad_"),
            "{name}: names the file: {err}"
        );
    }
}

#[test]
fn layering_merges_tools_rules_and_sandbox_settings() {
    let user = user_policy();
    assert_eq!(user.sources.len(), 2, "default <- user");
    // The user's tool setting replaces the preset's ask.
    assert_eq!(
        decide(
            &user,
            "write_file",
            r#"{"path": "notes.txt", "content": ""}"#
        ),
        (Verdict::Allow, "tools.write_file".into())
    );
    // The preset's rules still apply under the user's.
    assert_eq!(
        decide(&user, "write_file", r#"{"path": ".env", "content": ""}"#).0,
        Verdict::Deny
    );
    let over = Policy::load(&policy_file("over_user.toml")).expect("three layers");
    assert_eq!(over.sources.len(), 3);
    assert_eq!(
        decide(
            &over,
            "write_file",
            r#"{"path": "notes.txt", "content": ""}"#
        )
        .0,
        Verdict::Deny
    );
    // Sandbox: defaults <- language <- tool, layer by layer.
    let python = over.sandbox_for("execute_code", Some("python"));
    assert_eq!(python.memory_mb, Some(64), "over_user's python memory");
    assert_eq!(python.timeout_ms, Some(1000), "user's default timeout");
    assert_eq!(
        python.network,
        Some(Network::Loopback),
        "user's per-tool network"
    );
    assert_eq!(python.cpu_seconds, Some(30), "the preset's cpu");
    let bash = user.sandbox_for("execute_code", Some("bash"));
    assert_eq!(bash.memory_mb, Some(512));
    assert_eq!(
        user.sandbox_for("read_file", None).network,
        Some(Network::None)
    );
}

#[test]
fn every_rule_type_matches_and_precedence_holds() {
    let user = user_policy();
    let cases: &[(&str, &str, Verdict, &str)] = &[
        // prefix, with path normalization
        (
            "write_file",
            r#"{"path": "build/out.o", "content": ""}"#,
            Verdict::Ask,
            "rules[2]",
        ),
        (
            "write_file",
            r#"{"path": "./build//out.o", "content": ""}"#,
            Verdict::Ask,
            "rules[2]",
        ),
        (
            "write_file",
            r#"{"path": "src/../build/out.o", "content": ""}"#,
            Verdict::Ask,
            "rules[2]",
        ),
        (
            "write_file",
            r#"{"path": "buildings.txt", "content": ""}"#,
            Verdict::Allow,
            "tools.write_file",
        ),
        // regex over every string, any tool, case-insensitive in the pattern
        (
            "execute_code",
            r#"{"code": "open('/ETC/Shadow')", "language": "python"}"#,
            Verdict::Deny,
            "rules[3]",
        ),
        (
            "write_file",
            r#"{"path": "notes.txt", "content": "see /etc/sudoers"}"#,
            Verdict::Deny,
            "rules[3]",
        ),
        // glob, case-insensitive flag
        (
            "search_files",
            r#"{"pattern": "my_PASSWORD_here"}"#,
            Verdict::Ask,
            "rules[4]",
        ),
        (
            "search_files",
            r#"{"pattern": "username"}"#,
            Verdict::Allow,
            "tools.search_files",
        ),
        // deny beats ask when both match
        (
            "write_file",
            r#"{"path": "build/x", "content": "/etc/shadow"}"#,
            Verdict::Deny,
            "rules[3]",
        ),
        // the default preset's rule, from the base layer
        (
            "read_file",
            r#"{"path": ".git/config"}"#,
            Verdict::Deny,
            "rules[0]",
        ),
        // tools without settings fall back to defaults
        (
            "execute_code",
            r#"{"code": "print(1)", "language": "python"}"#,
            Verdict::Ask,
            "tools.execute_code",
        ),
    ];
    for (tool, args, verdict, rule) in cases {
        assert_eq!(
            decide(&user, tool, args),
            (*verdict, rule.to_string()),
            "{tool} {args}"
        );
    }
}

/// Hostile encodings of `.git/config` and `/etc/shadow` that must still be denied.
const HOSTILE: &[(&str, &str)] = &[
    (
        "read_file",
        r#"{"path": "\u002e\u0067\u0069\u0074/config"}"#,
    ),
    ("read_file", r#"{"path": ".git\/config"}"#),
    ("read_file", r#"{"path": "./.git/config"}"#),
    ("read_file", r#"{"path": ".//.git///config"}"#),
    ("read_file", r#"{"path": "docs/../.git/config"}"#),
    ("read_file", r#"{"path": "a/b/../../.git/config"}"#),
    ("read_file", r#"{"path": "sub/.git/HEAD"}"#),
    ("read_file", r#"{"path": ".env"}"#),
    ("read_file", r#"{"path": "app/.env.local"}"#),
    ("read_file", r#"{"path": "home/.ssh/id_ed25519"}"#),
    (
        "execute_code",
        r#"{"language": "python", "code": "open('\u002fetc\u002fshadow')"}"#,
    ),
    ("write_file", r#"{"content": "x /etc/shadow", "path": "a"}"#),
];

#[test]
fn hostile_argument_encodings_do_not_slip_past_deny_rules() {
    let user = user_policy();
    for (tool, args) in HOSTILE {
        assert_eq!(decide(&user, tool, args).0, Verdict::Deny, "{tool} {args}");
    }
    // A huge value with the secret at the end, and a huge nested document.
    let huge = format!(r#"{{"path": "{}/.git/config"}}"#, "a/..".repeat(50_000));
    assert_eq!(decide(&user, "read_file", &huge).0, Verdict::Deny);
    let nested = json!({"code": "print(1)", "language": "python"});
    let mut deep = json!("/etc/shadow");
    for _ in 0..100 {
        deep = json!({"k": [deep]});
    }
    let mut with_deep = nested.clone();
    with_deep["extra"] = deep;
    let decision = user.decide("execute_code", &with_deep, &Grants::default());
    assert_eq!(
        decision.verdict,
        Verdict::Deny,
        "a value hidden deep in the arguments"
    );
    // Duplicate keys never reach the policy: validation refuses them.
    let registry = Registry::with_builtins();
    let dup = registry.validate(&ToolCall::function(
        "c",
        "read_file",
        r#"{"path": "ok.txt", "path": ".git/config"}"#,
    ));
    assert!(dup.is_err());
}

#[test]
fn budgets_limit_calls_and_cut_output_with_a_marker() {
    let user = user_policy();
    let mut budget = user.budget_tracker();
    assert!(budget.admit_call().is_ok());
    assert!(budget.admit_call().is_ok());
    let third = budget.admit_call().expect_err("calls_per_turn = 2");
    assert!(third.to_string().contains("this turn"));
    budget.start_turn();
    assert!(budget.admit_call().is_ok());
    let fed = budget.feed_to_model(&"x".repeat(100));
    assert!(
        fed.starts_with(&"x".repeat(32)) && fed.contains("68 more bytes cut"),
        "{fed}"
    );
    assert_eq!(budget.feed_to_model("short"), "short");
    // A cut never splits a character: 31 ASCII bytes, then a 2-byte 'é'
    // across the 32-byte limit.
    let mut fresh = user.budget_tracker();
    let text = format!("{}é{}", "x".repeat(31), "y".repeat(10));
    let fed = fresh.feed_to_model(&text);
    assert!(
        fed.starts_with(&format!("{}\n[...", "x".repeat(31))) && fed.contains("12 more bytes cut"),
        "{fed}"
    );
}

#[test]
fn session_budgets_stop_the_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = Policy::from_toml(
        "extends = \"trusted\"\n[budgets]\ncalls_per_session = 1\n",
        Path::new("inline.toml"),
    )
    .expect("policy");
    let mut gate = Gate::new(Arc::new(Registry::with_builtins()), Arc::new(policy), "s");
    let ctx = ToolContext::new(Workspace::open(dir.path()).expect("workspace"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let first = runtime.block_on(gate.call(&ToolCall::function("1", "list_dir", "{}"), &ctx));
    assert_eq!(first.status, Status::Ok);
    let second = runtime.block_on(gate.call(&ToolCall::function("2", "list_dir", "{}"), &ctx));
    assert_eq!(second.status, Status::Denied);
    assert!(second.error.unwrap_or_default().contains("budget"));
}

#[test]
fn redaction_masks_builtin_and_custom_secrets() {
    let user = user_policy();
    let redactor = user.redactor();
    let text = "key AKIAABCDEFGHIJKLMNOP and ghp_abcdefghijklmnopqrstuvwxyz0123456789 and sk-proj-abcdefghijklmnopqrstuv TICKET-1234\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----\npassword = hunter2hunter2";
    let masked = redactor.redact(text);
    for secret in [
        "AKIAABCDEFGHIJKLMNOP",
        "ghp_abc",
        "sk-proj-abc",
        "TICKET-1234",
        "b3BlbnNzaC1rZXk",
        "hunter2hunter2",
    ] {
        assert!(!masked.contains(secret), "{secret} leaked: {masked}");
    }
    for name in [
        "aws-access-key-id",
        "github-token",
        "openai-key",
        "ticket",
        "private-key",
        "password-assignment",
    ] {
        assert!(
            masked.contains(&format!("[REDACTED:{name}]")),
            "{name}: {masked}"
        );
    }
    let off = Policy::from_toml("[redaction]\nbuiltin = false\n", Path::new("inline.toml"))
        .expect("policy");
    assert_eq!(
        off.redactor().redact("AKIAABCDEFGHIJKLMNOP"),
        "AKIAABCDEFGHIJKLMNOP"
    );
}

#[test]
fn approval_paths_yes_no_always_and_none() {
    let policy = Arc::new(Policy::preset("default").expect("default"));
    let registry = Arc::new(Registry::with_builtins());
    let dir = tempfile::tempdir().expect("tempdir");
    let ctx = ToolContext::new(Workspace::open(dir.path()).expect("workspace"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let write = |n: &str| {
        ToolCall::function(
            n,
            "write_file",
            format!(r#"{{"path": "{n}.txt", "content": "x"}}"#),
        )
    };

    // No handler: ask means deny, and nothing is written.
    let mut gate = Gate::new(Arc::clone(&registry), Arc::clone(&policy), "s");
    let outcome = runtime.block_on(gate.call(&write("none"), &ctx));
    assert_eq!(outcome.status, Status::Denied);
    assert!(!dir.path().join("none.txt").exists());

    // A callback answering no, then yes, then always.
    let answers = Arc::new(Mutex::new(vec![
        ApprovalAnswer::Always,
        ApprovalAnswer::Yes,
        ApprovalAnswer::No,
    ]));
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let (answers_in, asked_in) = (Arc::clone(&answers), Arc::clone(&asked));
    let approver = move |request: &ApprovalRequest| {
        asked_in.lock().expect("lock").push(request.rule.clone());
        answers_in
            .lock()
            .expect("lock")
            .pop()
            .unwrap_or(ApprovalAnswer::No)
    };
    let mut gate = Gate::new(Arc::clone(&registry), Arc::clone(&policy), "s")
        .with_approver(Arc::new(approver));
    assert_eq!(
        runtime.block_on(gate.call(&write("no"), &ctx)).status,
        Status::Denied
    );
    assert_eq!(
        runtime.block_on(gate.call(&write("yes"), &ctx)).status,
        Status::Ok
    );
    assert_eq!(
        runtime.block_on(gate.call(&write("always"), &ctx)).status,
        Status::Ok
    );
    assert_eq!(gate.grants().list().len(), 1, "always adds a grant");
    // The grant answers later asks without the handler.
    assert_eq!(
        runtime.block_on(gate.call(&write("granted"), &ctx)).status,
        Status::Ok
    );
    assert_eq!(
        asked.lock().expect("lock").len(),
        3,
        "the handler was not asked again"
    );
    // A grant never overrides a deny rule.
    let denied = runtime.block_on(gate.call(
        &ToolCall::function(
            "d",
            "write_file",
            r#"{"path": ".git/hooks/x", "content": "x"}"#,
        ),
        &ctx,
    ));
    assert_eq!(denied.status, Status::Denied);
    // Revoking the grant brings the question back (and the handler now says no).
    let grant = gate.grants().list()[0].clone();
    assert!(gate.grants().revoke(grant.id));
    assert!(!gate.grants().revoke(grant.id));
    assert_eq!(
        runtime.block_on(gate.call(&write("revoked"), &ctx)).status,
        Status::Denied
    );
    assert!(dir.path().join("granted.txt").exists() && !dir.path().join("revoked.txt").exists());
}

/// Approvals are asynchronous: the host answers from a task of its own
/// while the gate awaits, and no runtime thread is held meanwhile (this
/// runs on a current-thread runtime, where a blocking wait would hang).
#[tokio::test(flavor = "current_thread")]
async fn a_channel_approver_is_answered_from_another_task() {
    let policy = Policy::preset("default").expect("default");
    let registry = Registry::with_builtins();
    let (approver, mut requests) = ChannelApprover::new();
    let host = tokio::spawn(async move {
        let pending = requests.recv().await.expect("a request");
        assert_eq!(pending.request.tool, "write_file");
        pending.answer(ApprovalAnswer::Yes);
        // A request dropped unanswered is a no.
        let dropped = requests.recv().await.expect("a second request");
        drop(dropped);
    });
    let validate = || {
        registry
            .validate(&ToolCall::function(
                "c",
                "write_file",
                r#"{"path": "a", "content": "b"}"#,
            ))
            .expect("valid")
    };
    let authorized = policy
        .authorize(validate(), Some(&approver), &Grants::default())
        .await
        .expect("approved over the channel");
    assert_eq!(authorized.approval(), Some(ApprovalAnswer::Yes));
    let refused = policy
        .authorize(validate(), Some(&approver), &Grants::default())
        .await;
    assert!(refused.is_err(), "an unanswered request is refused");
    host.await.expect("host task");
}

#[test]
fn the_audit_log_holds_one_record_per_decision_and_per_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("audit/audit.jsonl");
    let audit = Arc::new(AuditLog::open(&log_path).expect("audit log"));
    let policy = Arc::new(Policy::preset("default").expect("default"));
    let approver = |_: &ApprovalRequest| ApprovalAnswer::Yes;
    let mut gate = Gate::new(Arc::new(Registry::with_builtins()), policy, "sess-1")
        .with_approver(Arc::new(approver))
        .with_audit_log(audit);
    let workspace = tempfile::tempdir().expect("tempdir");
    let ctx = ToolContext::new(Workspace::open(workspace.path()).expect("workspace"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let calls = [
        ToolCall::function(
            "1",
            "write_file",
            r#"{"path": "a.txt", "content": "AKIAABCDEFGHIJKLMNOP"}"#,
        ),
        ToolCall::function("2", "read_file", r#"{"path": "a.txt"}"#),
        ToolCall::function("3", "read_file", r#"{"path": ".git/config"}"#),
        ToolCall::function("4", "nope", "{}"),
    ];
    for call in &calls {
        runtime.block_on(gate.call(call, &ctx));
    }
    let text = std::fs::read_to_string(&log_path).expect("audit log written");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or("").to_string(),
                r["call_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("decision", "1"),
        ("result", "1"),
        ("decision", "2"),
        ("result", "2"),
        ("decision", "3"),
        ("result", "3"),
        ("result", "4"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(
        kinds, expected,
        "validation failures get a result record only"
    );
    assert_eq!(records[0]["approval"], "yes");
    assert_eq!(records[0]["session"], "sess-1");
    assert_eq!(records[4]["decision"], "deny");
    assert_eq!(records[4]["rule"], "rules[0]");
    assert_eq!(records[6]["status"], "invalid");
    assert!(
        !text.contains("AKIAABCDEFGHIJKLMNOP"),
        "arguments are redacted in the audit log"
    );
    assert!(records.iter().all(|r| r["time_ms"].as_u64().is_some()));
}

/// Red-team finding M5: under `default`, `.env`, `.git` and `.ssh` are off
/// limits to the file tools by the path they resolve to, not only by the
/// name the model gave: a symlink to them is refused, `search_files` skips
/// them, and listing a link to `.ssh` is refused. Ordinary files still work.
#[test]
fn off_limits_paths_stay_off_limits_through_links_and_searches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = dir.path();
    std::fs::create_dir_all(ws.join(".git")).expect("mkdir");
    std::fs::create_dir_all(ws.join(".ssh")).expect("mkdir");
    std::fs::create_dir_all(ws.join("src")).expect("mkdir");
    std::fs::write(ws.join(".env"), "DB_PASSWORD_IS=hunter2-prod\n").expect("write");
    std::fs::write(
        ws.join(".git/config"),
        "[remote \"origin\"]\n  url = https://user:ghp_NOTREAL@example.invalid/x\n",
    )
    .expect("write");
    std::fs::write(ws.join(".ssh/id_ed25519"), "FAKE-PRIVATE-KEY-MATERIAL\n").expect("write");
    std::fs::write(ws.join("src/app.py"), "def main(): pass\n").expect("write");
    std::os::unix::fs::symlink(".env", ws.join("envlink")).expect("symlink");
    std::os::unix::fs::symlink(".ssh", ws.join("s")).expect("symlink");
    std::os::unix::fs::symlink("src/app.py", ws.join("applink")).expect("symlink");
    std::fs::hard_link(ws.join(".env"), ws.join("hardenv")).expect("hard link");
    std::fs::write(
        ws.join(".netrc"),
        "machine x login y password hunter2-netrc\n",
    )
    .expect("write");
    let policy = Arc::new(Policy::preset("default").expect("default"));
    let mut gate = Gate::new(Arc::new(Registry::with_builtins()), policy, "s");
    let ctx = ToolContext::new(Workspace::open(ws).expect("workspace"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut call = |tool: &str, args: &str| {
        runtime.block_on(gate.call(&ToolCall::function("c", tool, args), &ctx))
    };
    let leaks = ["hunter2", "ghp_NOTREAL", "FAKE-PRIVATE-KEY"];
    for (tool, args) in [
        ("read_file", r#"{"path": "envlink"}"#),
        ("read_file", r#"{"path": "s/id_ed25519"}"#),
        ("list_dir", r#"{"path": "s"}"#),
        ("read_file", r#"{"path": ".env"}"#),
        ("read_file", r#"{"path": "hardenv"}"#),
        ("read_file", r#"{"path": ".netrc"}"#),
    ] {
        let outcome = call(tool, args);
        assert_ne!(outcome.status, Status::Ok, "{tool} {args}: {outcome:?}");
        let text = format!(
            "{}{}",
            outcome.stdout,
            outcome.error.clone().unwrap_or_default()
        );
        assert!(
            !leaks.iter().any(|l| text.contains(l)),
            "{tool} {args}: {outcome:?}"
        );
        assert!(
            text.contains("denied by policy") || text.contains("other hard links"),
            "{tool} {args}: {outcome:?}"
        );
    }
    let search = call("search_files", r#"{"pattern": "."}"#);
    assert_eq!(search.status, Status::Ok, "{search:?}");
    assert!(
        !leaks.iter().any(|l| search.stdout.contains(l)),
        "{search:?}"
    );
    assert!(
        search.stdout.contains("src/app.py:1: def main(): pass"),
        "{search:?}"
    );
    // Health: a link to an ordinary file reads as before.
    let linked = call("read_file", r#"{"path": "applink"}"#);
    assert_eq!(linked.status, Status::Ok, "{linked:?}");
    assert_eq!(linked.stdout, "def main(): pass\n");
}

#[test]
fn mcp_server_sections_decide_their_tools_and_are_checked() {
    let text = r#"
[defaults]
decision = "ask"

[mcp_servers.time]
command = "/usr/bin/python3"
args = ["-m", "mcp_server_time"]
decision = "allow"
network = "none"

[mcp_servers.time.tools.convert_time]
decision = "deny"
reason = "no converting"

[mcp_servers.fs]
command = "npx"
"#;
    let policy = Policy::from_toml(text, Path::new("mcp.toml")).expect("policy");
    // A per-tool entry, then the server's default, then the policy's.
    assert_eq!(
        decide_any(&policy, "time__convert_time", "{}"),
        (Verdict::Deny, "mcp_servers.time.tools.convert_time".into())
    );
    assert_eq!(
        decide_any(&policy, "time__get_current_time", "{}"),
        (Verdict::Allow, "mcp_servers.time".into())
    );
    assert_eq!(
        decide_any(&policy, "fs__read", "{}"),
        (Verdict::Ask, "defaults".into())
    );
    // A tool of no configured server gets nothing from the sections.
    assert_eq!(
        decide_any(&policy, "other__x", "{}"),
        (Verdict::Ask, "defaults".into())
    );
    // Names that had to be cut or sanitized stay apart, and so do their
    // policy entries.
    let long = "x".repeat(70);
    let (a, b) = (format!("{long}_delete"), format!("{long}_delete_all"));
    let (name_a, name_b) = (mcp_tool_name("srv", &a), mcp_tool_name("srv", &b));
    assert_ne!(name_a, name_b);
    assert!(name_a.len() <= 64 && name_b.len() <= 64);
    assert_ne!(mcp_tool_name("srv", "a b"), mcp_tool_name("srv", "a_b"));
    assert_eq!(mcp_tool_name("srv", "a_b"), "srv__a_b");
    let cut = Policy::from_toml(
        &format!(
            "[mcp_servers.srv]\ncommand = \"x\"\n[mcp_servers.srv.tools.{a}]\ndecision = \"allow\"\n[mcp_servers.srv.tools.{b}]\ndecision = \"deny\"\n"
        ),
        Path::new("cut.toml"),
    )
    .expect("policy");
    assert_eq!(decide_any(&cut, &name_a, "{}").0, Verdict::Allow);
    assert_eq!(decide_any(&cut, &name_b, "{}").0, Verdict::Deny);
    // Its sandbox: no network unless granted, CPU counted over its life.
    let sandbox = policy.mcp_server_sandbox(&policy.mcp_servers()["time"]);
    assert_eq!(sandbox.network, Network::None);
    assert_eq!(sandbox.limits.cpu_seconds, 600);

    for (bad, says) in [
        ("[mcp_servers.\"a__b\"]\ncommand = \"x\"\n", "server name"),
        ("[mcp_servers.\"a b\"]\ncommand = \"x\"\n", "server name"),
        ("[mcp_servers.x]\nargs = []\n", "give a `command`"),
        ("[mcp_servers.x]\ncommand = \"\"\n", "give a `command`"),
        (
            "[mcp_servers.x]\ncommand = \"y\"\nurl = \"http://127.0.0.1/mcp\"\n",
            "not both",
        ),
        (
            "[mcp_servers.x]\nurl = \"https://mcp.example.com/mcp\"\nnetwork = \"full\"\n",
            "`network` is a setting of a stdio server",
        ),
        (
            "[mcp_servers.x]\nurl = \"http://mcp.example.com/mcp\"\n",
            "plaintext",
        ),
        (
            "[mcp_servers.x]\nurl = \"http://[::2]:80/mcp\"\n",
            "plaintext",
        ),
        (
            "[mcp_servers.x]\nurl = \"https://u:p@mcp.example.com/\"\n",
            "credentials",
        ),
        (
            "[mcp_servers.x]\nurl = \"mcp.example.com\"\n",
            "not an http",
        ),
        ("[mcp_servers.x]\nurl = \"ws://127.0.0.1/\"\n", "scheme"),
        (
            "[mcp_servers.x]\ncommand = \"y\"\nbearer_token_env = \"T\"\n",
            "for a server given by `url`",
        ),
        (
            "[mcp_servers.x]\nurl = \"https://h/mcp\"\nbearer_token_env = \"NOT A NAME\"\n",
            "not an environment variable name",
        ),
        (
            "[mcp_servers.x]\nurl = \"https://h/mcp\"\nbearer_token = \"abc\"\n",
            "unknown field",
        ),
    ] {
        let err = Policy::from_toml(bad, Path::new("bad.toml"))
            .expect_err(bad)
            .to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
    // HTTP servers: https anywhere, plain http on this machine only.
    for good in [
        "https://mcp.example.com/mcp",
        "http://127.0.0.1:8931/mcp",
        "http://localhost/mcp",
        "http://[::1]:9000/",
    ] {
        let text = format!(
            "[mcp_servers.remote]\nurl = \"{good}\"\nbearer_token_env = \"REMOTE_TOKEN\"\ndecision = \"ask\"\n"
        );
        let policy = Policy::from_toml(&text, Path::new("good.toml")).expect(good);
        assert!(
            matches!(
                policy.mcp_servers()["remote"].endpoint(),
                stack_core::policy::McpEndpoint::Http {
                    bearer_token_env: Some("REMOTE_TOKEN"),
                    ..
                }
            ),
            "{good}"
        );
    }
}

/// A decision for any tool name (MCP tools are not in a plain registry).
fn decide_any(policy: &Policy, tool: &str, arguments: &str) -> (Verdict, String) {
    let arguments: Value = serde_json::from_str(arguments).expect("json");
    let decision = policy.decide(tool, &arguments, &Grants::default());
    (decision.verdict, decision.rule)
}

/// A client's policy for one session (`agent serve`) can only take rights
/// away from the host's: an attempt to loosen each kind of setting stays
/// at the host's level, and what the client tightens is tightened.
#[test]
fn a_policy_within_another_never_loosens_it() {
    let host = Arc::new(Policy::preset("default").expect("default"));
    let loosening = Policy::from_toml(
        r#"
[defaults]
decision = "allow"
[tools.execute_code]
decision = "allow"
[tools.list_dir]
decision = "deny"
reason = "this client never lists"
[sandbox]
network = "full"
memory_mb = 100000
timeout_ms = 2000
hidden_in_workspace = []
read_only_paths = ["/etc"]
[budgets]
calls_per_session = 100000
calls_per_turn = 2
"#,
        Path::new("client.toml"),
    )
    .expect("client policy parses")
    .within(Arc::clone(&host));
    // The host asks before running code; the client's allow does not win.
    let host_code = decide(
        &host,
        "execute_code",
        r#"{"language": "python", "code": "1"}"#,
    );
    let narrowed_code = decide(
        &loosening,
        "execute_code",
        r#"{"language": "python", "code": "1"}"#,
    );
    assert_eq!(host_code.0, Verdict::Ask);
    assert_eq!(narrowed_code, host_code);
    // The client's deny wins over the host's allow.
    assert_eq!(
        decide(&host, "list_dir", r#"{"path": "."}"#).0,
        Verdict::Allow
    );
    assert_eq!(
        decide(&loosening, "list_dir", r#"{"path": "."}"#),
        (Verdict::Deny, "session:tools.list_dir".to_string())
    );
    // The host's `.env` rule still applies.
    assert_eq!(
        decide(&loosening, "read_file", r#"{"path": ".env"}"#).0,
        Verdict::Deny
    );
    let host_box = host.sandbox_for("execute_code", Some("python"));
    let narrowed = loosening.sandbox_for("execute_code", Some("python"));
    assert_eq!(
        narrowed.network, host_box.network,
        "network stays the host's"
    );
    assert_eq!(narrowed.read_only_paths, host_box.read_only_paths);
    let (host_limits, narrowed_limits) = (
        process_policy(&host_box).limits,
        process_policy(&narrowed).limits,
    );
    assert_eq!(narrowed_limits.memory_bytes, host_limits.memory_bytes);
    assert_eq!(narrowed_limits.wall_ms, 2000, "a tighter timeout applies");
    // Emptying the hidden list does not un-hide the host's secrets.
    let hidden = narrowed.hidden_in_workspace.clone().unwrap_or_default();
    assert!(hidden.contains(&PathBuf::from(".env")), "{hidden:?}");
    assert_eq!(
        process_policy(&narrowed).protected,
        process_policy(&host_box).protected
    );
    assert_eq!(loosening.budgets.calls_per_turn, Some(2));
    assert_eq!(
        loosening.budgets.calls_per_session,
        host.budgets
            .calls_per_session
            .or(Some(100000))
            .map(|n| n.min(100000))
    );
    assert_eq!(
        loosening.privacy.keep_transcripts,
        host.privacy.keep_transcripts
    );
    assert!(loosening.outer().is_some());

    // A live interpreter, the backend, memory over a WASI host's default,
    // and the host's absolute protected paths stay the host's.
    let strict = Arc::new(
        Policy::from_toml(
            "extends = \"strict\"\n[sandbox.languages.python]\nstateful = false\n",
            Path::new("host.toml"),
        )
        .expect("parses"),
    );
    let client = Policy::from_toml(
        r#"
[sandbox]
backend = "process"
stateful = true
memory_mb = 512
"#,
        Path::new("client.toml"),
    )
    .expect("parses")
    .within(Arc::clone(&strict));
    let python = client.sandbox_for("execute_code", Some("python"));
    let host_python = strict.sandbox_for("execute_code", Some("python"));
    assert_eq!(python.backend, host_python.backend);
    assert_eq!(python.stateful, Some(false), "{python:?}");
    assert!(
        python.memory_mb <= host_python.memory_mb.or(Some(256)),
        "{python:?}"
    );
    let host_with_path = Arc::new(
        Policy::from_toml(
            r#"[sandbox]
hidden_in_workspace = ["/srv/ws/secret", ".env"]
"#,
            Path::new("host.toml"),
        )
        .expect("parses"),
    );
    let narrowed = Policy::from_toml("", Path::new("client.toml"))
        .expect("parses")
        .within(host_with_path);
    let hidden = narrowed
        .sandbox_for("read_file", None)
        .hidden_in_workspace
        .unwrap_or_default();
    assert!(
        hidden.contains(&PathBuf::from("/srv/ws/secret")),
        "{hidden:?}"
    );

    // A grant for the client's own rule never covers the host's rule of
    // the same name.
    let asking = Policy::from_toml(
        "[tools.execute_code]
decision = \"ask\"
",
        Path::new("client.toml"),
    )
    .expect("parses")
    .within(Arc::clone(&host));
    let grants = Grants::default();
    grants.add("execute_code", "session:tools.execute_code");
    let registry = Registry::with_builtins();
    let call = registry
        .validate(&ToolCall::function(
            "c",
            "execute_code",
            r#"{"language": "python", "code": "1"}"#,
        ))
        .expect("valid");
    let decided = asking.decide("execute_code", call.arguments(), &grants);
    assert_eq!(decided.verdict, Verdict::Ask, "{decided:?}");
    assert_eq!(decided.rule, "tools.execute_code");
}

/// A network allowlist: per-tool and per-language tables narrow the
/// default one (a host must pass both), a mode string replaces it, and a
/// client's session policy can only narrow a host's.
#[test]
fn network_allowlists_narrow_per_section_and_within_a_host() {
    use stack_sandbox::egress::Host;
    let policy = Policy::from_toml(
        r#"
[sandbox]
backend = "process"
network = { allow = ["pypi.org", "*.github.com"], deny = ["gist.github.com"] }
[sandbox.tools.shell]
network = { allow = ["api.github.com", "pypi.org"] }
[sandbox.languages.bash]
network = "none"
"#,
        Path::new("egress.toml"),
    )
    .expect("policy");
    let allows = |network: &Option<Network>, host: &str| -> bool {
        let list = network
            .as_ref()
            .and_then(|n| n.allowlist())
            .expect("an allowlist");
        list.decide(&Host::parse(host).expect("host"), 443).is_ok()
    };
    let defaults = policy.sandbox_for("execute_code", Some("python"));
    assert!(allows(&defaults.network, "raw.github.com"));
    assert!(allows(&defaults.network, "pypi.org"));
    assert!(!allows(&defaults.network, "gist.github.com"));
    let shell = policy.sandbox_for("shell", None);
    assert!(allows(&shell.network, "api.github.com"));
    assert!(allows(&shell.network, "pypi.org"));
    assert!(
        !allows(&shell.network, "raw.github.com"),
        "narrowed by the tool"
    );
    assert_eq!(
        policy.sandbox_for("execute_code", Some("bash")).network,
        Some(Network::None)
    );
    // Within a host: the client's allowlist inside the host's narrows it;
    // `full` asked by a client stays the host's allowlist; an allowlist
    // inside `loopback` is nothing.
    let host = Arc::new(policy);
    let client = Policy::from_toml(
        "[sandbox]\nnetwork = { allow = [\"pypi.org\", \"evil.test\"] }\n",
        Path::new("client.toml"),
    )
    .expect("client")
    .within(Arc::clone(&host));
    let narrowed = client.sandbox_for("execute_code", Some("python"));
    assert!(allows(&narrowed.network, "pypi.org"));
    assert!(!allows(&narrowed.network, "evil.test"), "not the host's");
    assert!(
        !allows(&narrowed.network, "api.github.com"),
        "not the client's"
    );
    let full = Policy::from_toml("[sandbox]\nnetwork = \"full\"\n", Path::new("c.toml"))
        .expect("client")
        .within(Arc::clone(&host));
    assert_eq!(
        full.sandbox_for("execute_code", Some("python")).network,
        host.sandbox_for("execute_code", Some("python")).network
    );
    let loopback_host = Arc::new(
        Policy::from_toml("[sandbox]\nnetwork = \"loopback\"\n", Path::new("h.toml"))
            .expect("host"),
    );
    let inside = Policy::from_toml(
        "[sandbox]\nnetwork = { allow = [\"pypi.org\"] }\n",
        Path::new("c.toml"),
    )
    .expect("client")
    .within(loopback_host);
    assert_eq!(
        process_policy(&inside.sandbox_for("execute_code", Some("python"))).network,
        Network::None
    );
    // The process policy carries the allowlist to the sandbox.
    assert!(process_policy(&shell).network.allowlist().is_some());
}

/// A purge rewriting a sealed audit log keeps the cipher the log was made
/// with, whatever the vault would choose for a new file: a runtime from
/// before AES-256-GCM records, or before format 3, may still be appending
/// to it.
#[test]
fn a_rewrite_keeps_a_sealed_logs_cipher() {
    use stack_seal::key::KeySource;
    use stack_seal::record::{read_records, sealed_with, Appender, Hold};
    use stack_seal::{Key, RecordCipher, Vault};
    for (made_with, vault_cipher) in [
        (RecordCipher::XChaCha20Poly1305, RecordCipher::Aes256Gcm),
        (RecordCipher::Aes256Gcm, RecordCipher::XChaCha20Poly1305),
        (RecordCipher::Aes256GcmV2, RecordCipher::Aes256Gcm),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let key = Key::generate();
        let old = Vault::sealing(key.clone(), KeySource::Given).with_record_cipher(made_with);
        let mut appender = Appender::open(&path, "audit", &old, Hold::Nothing).expect("open");
        for session in ["a", "b"] {
            appender
                .append(json!({ "session": session }).to_string().as_bytes())
                .expect("append");
        }
        drop(appender);
        let vault = Vault::sealing(key, KeySource::Given).with_record_cipher(vault_cipher);
        let removed =
            stack_core::policy::audit::rewrite(&path, &vault, |r| r["session"] == "a", |_| None)
                .expect("rewrite");
        assert_eq!(removed, 1);
        let header = sealed_with(&path).expect("header").expect("still sealed");
        assert_eq!(header.cipher, made_with);
        assert_eq!(
            read_records(&path, Some("audit"), &vault)
                .expect("read")
                .items,
            vec![br#"{"session":"b"}"#.to_vec()]
        );
    }
}

/// An append never waits for a rewrite (a deletion or purge holding the
/// log under an exclusive `flock`): async callers must not block. The
/// records it held off are written, in order, once the rewrite is done.
#[test]
fn an_append_during_a_rewrite_returns_at_once_and_is_written_after_in_order() {
    use stack_core::policy::audit::{now_ms, AuditRecord};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&path).expect("audit log"));
    let record = |call: &str| AuditRecord::Result {
        time_ms: now_ms(),
        session: "s".into(),
        call_id: call.into(),
        tool: "read_file".into(),
        status: "ok".into(),
        duration_ms: 1,
        limit: None,
        error: None,
    };
    audit.append(&record("before")).expect("append");
    // What a rewrite holds while it runs.
    let rewrite = std::fs::File::open(&path).expect("open");
    rewrite.lock().expect("exclusive lock");
    let (done, finished) = std::sync::mpsc::channel();
    let appending = Arc::clone(&audit);
    std::thread::spawn(move || {
        for call in ["held-1", "held-2"] {
            appending.append(&record(call)).expect("append");
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the appends returned while the rewrite held the log");
    let calls = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("json")["call_id"].to_string())
            .collect()
    };
    assert_eq!(
        calls(&std::fs::read_to_string(&path).expect("read")),
        vec!["\"before\""]
    );
    rewrite.unlock().expect("unlock");
    audit.append(&record("after")).expect("append");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let written = calls(&std::fs::read_to_string(&path).expect("read"));
        if written.len() == 4 {
            assert_eq!(
                written,
                vec!["\"before\"", "\"held-1\"", "\"held-2\"", "\"after\""]
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "written: {written:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
