//! `agent mcp`, driven by the official MCP Python SDK (`mcp` on PyPI) as a
//! real client, over stdio and over Streamable HTTP, against real files and
//! the real sandboxes. `tests/clients/mcp_client.py` runs one scenario per
//! call and prints what it saw; the assertions are here.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A workspace with a note and a secret the default policy keeps out.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "hello notes\n").expect("write");
    std::fs::write(dir.path().join(".env"), "API_KEY=do-not-leak\n").expect("write");
    dir
}

fn client_script() -> PathBuf {
    common::repo_root().join("tests/clients/mcp_client.py")
}

/// Runs a scenario against `agent mcp ARGS` over stdio.
fn over_stdio(scenario: &str, workspace: &Path, args: &[&str]) -> Value {
    let agent = common::agent_binary();
    let mut argv: Vec<String> = vec![
        scenario.into(),
        "stdio".into(),
        agent.display().to_string(),
        "mcp".into(),
        "--workspace".into(),
        workspace.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    run_client(&argv)
}

fn run_client(argv: &[String]) -> Value {
    let output = Command::new(common::client_python())
        .arg(client_script())
        .args(argv)
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the MCP client failed ({argv:?}):\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "the MCP client printed no JSON ({err}):\n{stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn status(result: &Value) -> &str {
    result["structured"]["status"].as_str().unwrap_or("<none>")
}

fn text(result: &Value) -> &str {
    result["text"].as_str().unwrap_or("")
}

/// What `basics` saw, over either transport.
fn check_basics(seen: &Value) {
    let tools: Vec<&str> = seen["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // The built-ins, and the schema-file tools of the shipped `tools/`.
    for tool in [
        "execute_code",
        "read_file",
        "write_file",
        "list_dir",
        "search_files",
        "unit_convert",
        "csv_json",
    ] {
        assert!(tools.contains(&tool), "{tool} is not listed: {tools:?}");
    }
    assert_eq!(
        seen["schemas"]["read_file"]["required"],
        serde_json::json!(["path"])
    );

    let read = &seen["read"];
    assert_eq!(read["is_error"], false, "{read}");
    assert_eq!(text(read), "hello notes\n");
    assert_eq!(status(read), "ok");

    // The default policy asks before running code: the client was asked
    // (and accepted), and the code ran in the sandbox.
    let code = &seen["code"];
    assert_eq!(code["is_error"], false, "{code}");
    assert_eq!(text(code).trim(), "42");
    let asked: Vec<&str> = seen["asked"]
        .as_array()
        .expect("asked")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(asked[0].contains("`execute_code`"), "{asked:?}");

    let secret = &seen["secret"];
    assert_eq!(secret["is_error"], true);
    assert_eq!(status(secret), "denied", "{secret}");
    assert!(!text(secret).contains("do-not-leak"), "{secret}");

    // An unknown tool is a protocol error, as the MCP spec has it.
    let unknown = &seen["unknown"];
    assert_eq!(unknown["code"], -32602, "{unknown}");
    assert!(
        unknown["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown tool `no_such_tool`")),
        "{unknown}"
    );

    let bad = &seen["bad_arguments"];
    assert_eq!(status(bad), "invalid", "{bad}");
    assert_eq!(bad["is_error"], true);

    // Approved (the policy asks before any write), and still refused: the
    // path leaves the workspace.
    assert!(asked[1].contains("`write_file`"), "{asked:?}");
    assert_eq!(asked.len(), 2, "{asked:?}");
    let outside = &seen["write_outside"];
    assert_eq!(outside["is_error"], true, "{outside}");
    assert!(text(outside).contains("outside"), "{outside}");
}

#[test]
fn a_stdio_client_lists_the_tools_and_every_call_goes_through_the_gate() {
    let ws = workspace();
    let audit = tempfile::tempdir().expect("tempdir");
    let audit_log = audit.path().join("audit.jsonl");
    let seen = over_stdio(
        "basics",
        ws.path(),
        &["--audit-log", audit_log.to_str().expect("utf8")],
    );
    check_basics(&seen);
    // Every call is in the audit log, the call to a tool that does not
    // exist among them (refused as invalid, as a model's would be).
    let records: Vec<Value> = std::fs::read_to_string(&audit_log)
        .expect("the audit log")
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit record"))
        .collect();
    let unknown: Vec<&Value> = records
        .iter()
        .filter(|r| r["tool"] == "no_such_tool")
        .collect();
    assert_eq!(unknown.len(), 1, "{records:?}");
    assert_eq!(unknown[0]["status"], "invalid", "{records:?}");
    assert!(
        records.iter().any(|r| r["tool"] == "read_file"),
        "{records:?}"
    );
    assert!(
        !ws.path()
            .parent()
            .expect("parent")
            .join("outside.txt")
            .exists(),
        "write_file reached outside the workspace"
    );
}

#[test]
fn an_ask_becomes_an_elicitation_and_remember_stops_the_asking() {
    let ws = workspace();
    let seen = over_stdio("elicit", ws.path(), &[]);
    // First answer: decline.
    assert_eq!(status(&seen["declined"]), "denied", "{seen}");
    assert!(text(&seen["declined"]).contains("declined"), "{seen}");
    // Second: approve and remember; third: not asked again, and it runs
    // even though this client would now decline.
    assert_eq!(text(&seen["remembered"]), "ran\n", "{seen}");
    assert_eq!(text(&seen["after"]), "ran\n", "{seen}");
    assert_eq!(seen["asked"], 2, "{seen}");
    let message = seen["message"].as_str().expect("message");
    assert!(
        message.contains("execute_code") && message.contains("echo ran"),
        "{message}"
    );
}

/// The approval form shows the whole call: a command after 5,000 bytes
/// of padding is in the message the user answers (it was once cut at
/// 2,000 bytes, so what was approved was a prefix of what would run).
#[test]
fn the_approval_form_shows_the_whole_call() {
    let ws = workspace();
    let seen = over_stdio("long-elicit", ws.path(), &[]);
    assert_eq!(status(&seen["declined"]), "denied", "{seen}");
    let message = seen["message"].as_str().expect("the client was asked");
    assert!(
        message.contains("echo hidden-tail > planted.txt"),
        "the form hid the end of the call: …{}",
        &message[message.len().saturating_sub(200)..]
    );
    assert!(message.contains(&"#".repeat(5000)), "the padding was cut");
    assert!(!ws.path().join("planted.txt").exists());
}

#[test]
fn without_elicitation_an_ask_is_refused_unless_yes() {
    let ws = workspace();
    let refused = over_stdio("no-elicitation", ws.path(), &[]);
    assert_eq!(status(&refused["code"]), "denied", "{refused}");
    assert!(
        text(&refused["code"]).contains("no one can approve it"),
        "{refused}"
    );
    let approved = over_stdio("no-elicitation", ws.path(), &["--yes"]);
    assert_eq!(text(&approved["code"]), "ran\n", "{approved}");
}

#[test]
fn a_policy_file_decides_mcp_calls() {
    let ws = workspace();
    let policy = ws.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[defaults]\ndecision = \"allow\"\n\n[tools.read_file]\ndecision = \"deny\"\nreason = \"no reading here\"\n",
    )
    .expect("policy");
    let seen = over_stdio(
        "no-elicitation",
        ws.path(),
        &["--policy", policy.to_str().expect("utf8")],
    );
    // execute_code is allowed outright by this policy: no approval needed;
    // read_file, allowed by the default preset, is denied by this one.
    assert_eq!(text(&seen["code"]), "ran\n", "{seen}");
    assert_eq!(status(&seen["read"]), "denied", "{seen}");
    assert!(text(&seen["read"]).contains("no reading here"), "{seen}");
}

#[test]
fn a_session_is_not_cut_off_by_the_per_turn_call_limit() {
    let ws = workspace();
    let seen = over_stdio("many", ws.path(), &[]);
    let statuses = seen["statuses"].as_array().expect("statuses");
    assert_eq!(statuses.len(), 24);
    assert!(statuses.iter().all(|s| s == "ok"), "{seen}");
}

#[test]
fn a_protected_name_planted_by_a_cancelled_call_is_moved_aside() {
    // With a disk budget (the default policy's), a cancelled call's writes
    // are never written back: nothing is planted at all. The audit log
    // shows that the call was admitted and then stopped by the cancel (so
    // the check is not passed by a call that never ran).
    let ws = workspace();
    let audit = tempfile::tempdir().expect("tempdir");
    let audit_log = audit.path().join("audit.jsonl");
    let seen = over_stdio(
        "cancel-plant",
        ws.path(),
        &["--audit-log", audit_log.to_str().expect("utf8")],
    );
    assert!(
        !ws.path().join(".envrc").exists(),
        "the planted .envrc survived the cancellation: {seen}"
    );
    let records = std::fs::read_to_string(&audit_log).expect("the audit log");
    assert!(
        records.contains(r#""approval":"always""#)
            && records.contains("cancelled by the caller after"),
        "the call was not admitted and then cancelled: {records}"
    );
    // Without one, the call writes to the workspace directly, and what it
    // planted is moved aside once it is gone.
    let ws = workspace();
    let policy = ws.path().join("direct.toml");
    std::fs::write(
        &policy,
        "[defaults]\ndecision = \"allow\"\n\n[sandbox]\nbackend = \"process\"\ndisk_mb = 0\n",
    )
    .expect("policy");
    let seen = over_stdio(
        "cancel-plant",
        ws.path(),
        &["--policy", policy.to_str().expect("utf8")],
    );
    assert!(
        !ws.path().join(".envrc").exists(),
        "the planted .envrc survived the cancellation: {seen}"
    );
    let quarantined = std::fs::read_dir(ws.path())
        .expect("list")
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".envrc.stack-quarantine-")
        });
    assert!(quarantined, "{seen}");
}

#[test]
fn cancelling_a_call_kills_its_sandboxed_process() {
    let ws = workspace();
    let audit = ws.path().join("audit.jsonl");
    let seen = over_stdio(
        "cancel",
        ws.path(),
        &["--audit-log", audit.to_str().expect("utf8")],
    );
    assert_eq!(seen["finished"], Value::Null, "the call finished: {seen}");
    // The code would have written late.txt 4 s in; the client looked 5.5 s in.
    assert_eq!(status(&seen["late"]), "failed", "late.txt exists: {seen}");
    assert!(!ws.path().join("late.txt").exists());
    assert_eq!(text(&seen["again"]), "still here\n", "{seen}");
    let log = std::fs::read_to_string(&audit).expect("audit log");
    assert!(log.contains("cancelled by the caller"), "{log}");
}

#[test]
fn cancelling_a_stateful_python_call_stops_the_guest_and_restarts_the_session() {
    let ws = workspace();
    let seen = over_stdio("cancel-python", ws.path(), &["--sandbox", "wasi"]);
    assert_eq!(seen["finished"], Value::Null, "the call finished: {seen}");
    assert_eq!(status(&seen["late"]), "failed", "late.txt exists: {seen}");
    assert!(!ws.path().join("late.txt").exists());
    let again = &seen["again"];
    assert_eq!(again["structured"]["stdout"], "still here\n", "{seen}");
    assert!(
        text(again).contains("the previous call was cancelled"),
        "{again}"
    );
}

/// `agent mcp --http` on a free loopback port, killed when dropped.
struct HttpServer {
    child: Child,
    url: String,
}

impl HttpServer {
    /// With `token`, or with `--no-auth` when it is empty.
    fn start(workspace: &Path, token: &str) -> HttpServer {
        Self::start_with(workspace, token, &[])
    }

    /// The same, with `extra` arguments for `agent mcp`.
    fn start_with(workspace: &Path, token: &str, extra: &[&str]) -> HttpServer {
        let mut command = Command::new(common::agent_binary());
        command.args(["mcp", "--http", "127.0.0.1:0"]).args(extra);
        if token.is_empty() {
            command.arg("--no-auth");
        } else {
            command.args(["--token-env", "MCP_TEST_TOKEN"]);
        }
        let mut child = command
            .arg("--workspace")
            .arg(workspace)
            .env("MCP_TEST_TOKEN", token)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent mcp --http");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("agent mcp --http exited before it listened")
                .expect("read stderr");
            if let Some(url) = line.strip_prefix("agent mcp: serving MCP at ") {
                break url.to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || lines.for_each(drop));
        HttpServer { child, url }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn http_serves_the_same_gate_and_refuses_requests_without_the_token() {
    let ws = workspace();
    let token = "correct-horse-battery";
    let server = HttpServer::start(ws.path(), token);
    let seen = run_client(&[
        "basics".into(),
        "http".into(),
        server.url.clone(),
        token.into(),
    ]);
    check_basics(&seen);
    let refusals = run_client(&[
        "http-refusals".into(),
        "http".into(),
        server.url.clone(),
        token.into(),
    ]);
    let statuses = &refusals["statuses"];
    assert_eq!(statuses["no_token"], 401, "{refusals}");
    assert_eq!(statuses["wrong_token"], 401, "{refusals}");
    // DNS rebinding: a page on attacker.example that resolves to 127.0.0.1.
    assert_eq!(statuses["rebound_host"], 403, "{refusals}");
    assert_eq!(statuses["foreign_origin"], 403, "{refusals}");
    // The same request with the token and a loopback Host goes through (so
    // the refusals above are the checks, not a broken request).
    assert_eq!(statuses["good"], 200, "{refusals}");
    // A request outside any session is refused, not given a fresh one.
    assert_eq!(statuses["sessionless"], 400, "{refusals}");
    assert_eq!(refusals["sessionless_error"]["code"], -32022, "{refusals}");
}

/// Two MCP sessions on one HTTP server at once: each has its own Python
/// interpreter, and an approval remembered in one still asks in the other.
#[test]
fn http_sessions_keep_their_interpreters_and_approvals_apart() {
    let ws = workspace();
    let token = "separate-sessions-token";
    // Python in WASI keeps an interpreter per session.
    let server = HttpServer::start_with(ws.path(), token, &["--sandbox", "wasi"]);
    let seen = run_client(&[
        "isolation".into(),
        "http".into(),
        server.url.clone(),
        token.into(),
    ]);
    assert_eq!(text(&seen["a_set"]).trim(), "set", "{seen}");
    let b_read = &seen["b_read"];
    assert!(
        b_read.to_string().contains("NameError"),
        "session B saw session A's variable: {b_read}"
    );
    assert_eq!(text(&seen["a_read"]).trim(), "42", "{seen}");
    assert_eq!(seen["a_asked"], 1, "A's remembered approval held: {seen}");
    assert_eq!(seen["b_asked"], 1, "B was asked for itself: {seen}");
}

#[test]
fn without_a_token_host_and_origin_still_hold() {
    let ws = workspace();
    let server = HttpServer::start(ws.path(), "");
    let refusals = run_client(&["http-refusals".into(), "http".into(), server.url.clone()]);
    let statuses = &refusals["statuses"];
    assert_eq!(statuses["rebound_host"], 403, "{refusals}");
    assert_eq!(statuses["foreign_origin"], 403, "{refusals}");
    assert_eq!(statuses["good"], 200, "{refusals}");
    assert_eq!(statuses["sessionless"], 400, "{refusals}");
}

#[test]
fn http_without_a_token_given_makes_one() {
    let ws = workspace();
    let mut child = Command::new(common::agent_binary())
        .args(["mcp", "--http", "127.0.0.1:0", "--workspace"])
        .arg(ws.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent mcp --http");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
    let url = lines
        .find_map(|l| {
            l.strip_prefix("agent mcp: serving MCP at ")
                .map(str::to_string)
        })
        .expect("the URL line");
    let token_line = lines.next().expect("the token line");
    let token = token_line
        .split("Bearer ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("a token")
        .to_string();
    assert_eq!(token.len(), 64, "{token_line}");
    std::thread::spawn(move || lines.for_each(drop));
    let refusals = run_client(&["http-refusals".into(), "http".into(), url, token]);
    assert_eq!(refusals["statuses"]["no_token"], 401, "{refusals}");
    assert_eq!(refusals["statuses"]["good"], 200, "{refusals}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn http_cancellation_kills_the_call_too() {
    let ws = workspace();
    let server = HttpServer::start(ws.path(), "t0ken");
    let seen = run_client(&[
        "cancel".into(),
        "http".into(),
        server.url.clone(),
        "t0ken".into(),
    ]);
    assert_eq!(seen["finished"], Value::Null, "{seen}");
    assert!(!ws.path().join("late.txt").exists(), "{seen}");
    assert_eq!(text(&seen["again"]), "still here\n", "{seen}");
}

#[test]
fn http_refuses_a_public_address_without_a_token() {
    let ws = workspace();
    let output = Command::new(common::agent_binary())
        .args(["mcp", "--http", "0.0.0.0:0", "--workspace"])
        .arg(ws.path())
        .output()
        .expect("run agent mcp");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address and no bearer token"),
        "{stderr}"
    );
}

/// A copy of the `mcp-server-time` venv that `scripts/setup --peers` built,
/// where the sandbox's user may read it (the cache under root's home is
/// closed to it), made once per test run.
fn server_venv() -> &'static Path {
    static COPY: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let built = common::client_python()
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .expect("the clients folder")
            .join("server-venv");
        assert!(
            built.join("bin/python").is_file(),
            "{} is missing: run `scripts/setup --peers`",
            built.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&built)
            .arg(dir.path().join("venv"))
            .status()
            .expect("cp");
        assert!(status.success());
        open_to_all(dir.path());
        dir
    })
    .path()
}

/// Readable (and enterable) by every user, as a system folder is.
fn open_to_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A policy over `default` that runs `mcp-server-time` (from
/// [`server_venv`]) as the server `time`, its tools allowed, then `more`.
fn time_server_policy(workspace: &Path, more: &str) -> PathBuf {
    let venv = server_venv().join("venv");
    let policy = workspace.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"extends = "default"

[mcp_servers.time]
command = "{python}"
args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
read_only = ["{venv}"]
decision = "allow"

{more}"#,
            python = venv.join("bin/python").display(),
            venv = venv.display()
        ),
    )
    .expect("policy");
    policy
}

#[test]
fn a_third_party_mcp_server_runs_in_the_sandbox_behind_the_policy() {
    let ws = workspace();
    let policy = time_server_policy(
        ws.path(),
        "[mcp_servers.time.tools.convert_time]\ndecision = \"deny\"\nreason = \"no converting here\"\n",
    );
    let seen = over_stdio(
        "third-party",
        ws.path(),
        &["--policy", policy.to_str().expect("utf8")],
    );
    // Its tools are listed, under their server's name, with their schemas.
    let schema = &seen["tools"]["time__get_current_time"];
    assert_eq!(
        schema["required"],
        serde_json::json!(["timezone"]),
        "{seen}"
    );
    assert!(seen["tools"].get("time__convert_time").is_some(), "{seen}");
    // A call runs in the sandboxed server; its answer comes back.
    assert_eq!(seen["now"]["is_error"], false, "{seen}");
    assert!(text(&seen["now"]).contains("Europe/Paris"), "{seen}");
    // Arguments are validated against the server's own schema first.
    assert_eq!(status(&seen["bad"]), "invalid", "{seen}");
    // And the policy decides per server tool.
    assert_eq!(status(&seen["convert"]), "denied", "{seen}");
    assert!(
        text(&seen["convert"]).contains("no converting here"),
        "{seen}"
    );

    // `agent tool list --policy` shows them, as tools of an MCP server.
    let listed = Command::new(common::agent_binary())
        .args(["tool", "list", "--policy"])
        .arg(&policy)
        .arg("--workspace")
        .arg(ws.path())
        .output()
        .expect("agent tool list");
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listing}");
    let line = listing
        .lines()
        .find(|l| l.starts_with("time__get_current_time "))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains(" mcp "), "{line}");

    // `agent policy explain` decides a server's tool as a call would.
    let explained = Command::new(common::agent_binary())
        .args(["policy", "explain"])
        .arg(&policy)
        .args(["--tool", "time__convert_time", "--args"])
        .arg(r#"{"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}"#)
        .current_dir(ws.path())
        .output()
        .expect("agent policy explain");
    let explained: Value = serde_json::from_slice(&explained.stdout).expect("json");
    assert_eq!(explained["decision"], "deny", "{explained}");
    assert_eq!(
        explained["rule"], "mcp_servers.time.tools.convert_time",
        "{explained}"
    );
    assert_eq!(explained["sandbox"]["mcp_server"], "time", "{explained}");
}

#[test]
fn a_hostile_mcp_server_is_contained_and_the_runtime_stays_healthy() {
    let ws = workspace();
    let code = tempfile::tempdir().expect("tempdir");
    open_to_all(code.path());
    let server = code.path().join("hostile_server.py");
    std::fs::copy(common::fixture("mcp/hostile_server.py"), &server).expect("copy");
    let outside = tempfile::tempdir().expect("tempdir");
    // World-writable: only the sandbox stops the write.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let policy = ws.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"extends = "default"

[mcp_servers.hostile]
command = "/usr/bin/python3"
args = ["{server}"]
read_only = ["{server}"]
decision = "allow"
timeout_ms = 2000
processes = 32
memory_mb = 256
"#,
            server = server.display()
        ),
    )
    .expect("policy");
    let pwned = outside.path().join("pwned.txt");
    // Secrets that ordinary file modes leave readable to anyone: a key in
    // a home's `.ssh`, and a file beside it.
    let home = outside.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).expect("mkdir .ssh");
    std::fs::write(home.join(".ssh/id_rsa"), "PRIVATE KEY 4471").expect("key");
    let readable = outside.path().join("readable.txt");
    std::fs::write(&readable, "SECRET 4471").expect("secret");
    {
        use std::os::unix::fs::PermissionsExt;
        for folder in [home.clone(), home.join(".ssh")] {
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for file in [home.join(".ssh/id_rsa"), readable.clone()] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
    }
    let args = serde_json::json!({
        "outside": pwned,
        "port": port,
        "home": home,
        "readable": readable,
    })
    .to_string();
    let mut argv: Vec<String> = vec![
        "hostile".into(),
        "stdio".into(),
        common::agent_binary().display().to_string(),
        "mcp".into(),
        "--workspace".into(),
        ws.path().display().to_string(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    let output = Command::new(common::client_python())
        .arg(client_script())
        .args(argv.drain(..))
        .env("MCP_SCENARIO_ARGS", &args)
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("json");

    // Its tools joined, names sanitized; the one with a broken schema did not.
    let tools = seen["tools"].to_string();
    let sanitized = stack_runtime::policy::mcp_tool_name("hostile", "bad.name/with spaces");
    assert!(tools.contains(&sanitized), "{tools}");
    assert!(!tools.contains("bad_schema"), "{tools}");

    // Every attack failed.
    let attack: Value = serde_json::from_str(text(&seen["attack"])).expect("attack report");
    for probe in [
        "shadow",
        "root_ssh",
        "root_home",
        "ssh_key",
        "ssh_dir",
        "readable_outside",
        "home_ssh",
        "write_outside",
        "tcp",
        "udp",
        "dns",
    ] {
        let said = attack[probe].as_str().unwrap_or("");
        assert!(said.starts_with("blocked"), "{probe}: {said}");
    }
    assert!(!pwned.exists(), "the server wrote outside the workspace");
    assert!(
        listener.accept().is_err(),
        "the server reached a host TCP listener"
    );
    let forks = attack["forks"].as_u64().expect("forks");
    assert!(forks < 32, "the fork bomb was not stopped: {forks} forks");

    // Misbehaving as a peer: each is a clear error, and the next call works.
    assert_eq!(status(&seen["hang"]), "timeout", "{seen}");
    assert!(
        seen["hang"]["seconds"].as_f64().expect("s") < 10.0,
        "{seen}"
    );
    // The timeout cancelled the call on the wire: the server got
    // `notifications/cancelled` for it.
    let cancelled = std::fs::read_to_string(ws.path().join("cancelled.txt")).unwrap_or_default();
    assert!(
        cancelled.contains("requestId"),
        "the server was never told the hung call was cancelled: {cancelled:?}"
    );
    assert!(
        text(&seen["die"]).contains("ended during the call"),
        "{seen}"
    );
    // 2 GiB against a 256 MiB limit: refused, or the server is killed and
    // started again; never filled.
    let hog = text(&seen["hog"]);
    assert!(
        hog.starts_with("blocked: MemoryError") || hog.contains("ended during the call"),
        "{seen}"
    );
    // Its stderr went to the log (`agent mcp`'s stderr, which the client
    // passes on), with the key it printed masked.
    let logged = String::from_utf8_lossy(&output.stderr);
    assert!(logged.contains("hostile: started"), "{logged}");
    assert!(
        !logged.contains("IOSFODNN7EXAMPLE") && !logged.contains("hostileKeyBody4471"),
        "the server's stderr reached the log unredacted: {logged}"
    );
    assert_eq!(
        text(&seen["bad_name_with_spaces"]),
        "ok bad.name/with spaces",
        "{seen}"
    );
    assert!(text(&seen["flood"]).contains("over 4 MiB"), "{seen}");
    assert!(
        text(&seen["malformed"]).contains("not a tool result"),
        "{seen}"
    );
    // A 3 MiB error message reaches the client cut to the session's
    // budget for a result (16 KiB in the default preset), in the result's
    // structured content as in its text (the output cap, 1 MiB, holds it
    // in the audit log and transcripts: see dispatch's unit test).
    // Requests of its own, sent faster than it reads the answers: the
    // connection is closed rather than the answers piled up in memory.
    assert!(
        text(&seen["ping_flood"]).contains("faster than it read the answers"),
        "{}",
        seen["ping_flood"]
    );
    let huge = &seen["huge_error"];
    let error = huge["structured"]["error"].as_str().expect("an error");
    // (The text's framing and the budget's marker count in those 16 KiB.)
    assert!(
        error.len() <= (16 << 10) + 256,
        "an error of {} bytes",
        error.len()
    );
    assert_eq!(huge["structured"]["truncated"], true, "{}", error.len());
    assert!(text(huge).len() <= (16 << 10) + 200, "{}", text(huge).len());
    assert_eq!(text(&seen["health"]), "hello notes\n", "{seen}");

    // The writer it detached did not outlive the session.
    let outlive = ws.path().join("outlive.txt");
    assert!(outlive.exists(), "the detached writer never ran");
    std::fs::remove_file(&outlive).expect("remove");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !outlive.exists(),
        "a process of the MCP server outlived its session"
    );
}

/// An MCP server's tool passes the same gate as a native tool: the
/// server gets only the environment variables its entry lists, an argument
/// rule on its tool denies, secrets in its answers are redacted, and the
/// session's call budget stops it.
#[test]
fn an_mcp_servers_tool_passes_the_whole_gate() {
    let ws = workspace();
    let code = tempfile::tempdir().expect("tempdir");
    open_to_all(code.path());
    let server = code.path().join("hostile_server.py");
    std::fs::copy(common::fixture("mcp/hostile_server.py"), &server).expect("copy");
    let policy = ws.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"extends = "default"

[budgets]
calls_per_session = 3

[mcp_servers.hostile]
command = "/usr/bin/python3"
args = ["{server}"]
read_only = ["{server}"]
env = ["STACK_RUNTIME_TEST_PASSED"]
decision = "allow"

[[rules]]
tool = "hostile__echo"
pointer = "/text"
regex = "forbidden"
decision = "deny"
reason = "no forbidden words"
"#,
            server = server.display()
        ),
    )
    .expect("policy");
    let output = Command::new(common::client_python())
        .arg(client_script())
        .args(["gate", "stdio"])
        .arg(common::agent_binary())
        .arg("mcp")
        .arg("--workspace")
        .arg(ws.path())
        .arg("--policy")
        .arg(&policy)
        .env("STACK_RUNTIME_TEST_PASSED", "given")
        .env("STACK_RUNTIME_TEST_WITHHELD", "kept back")
        .output()
        .expect("run the MCP client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}
{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("json");
    let calls = seen["calls"].as_array().expect("calls");

    // The clean call: only the listed variable, and the secret masked.
    let first = &calls[0];
    assert_eq!(first["is_error"], false, "{first}");
    let said: Value = serde_json::from_str(text(first)).expect("echo json");
    assert_eq!(said["text"], "hello");
    assert_eq!(
        said["env"],
        serde_json::json!({"STACK_RUNTIME_TEST_PASSED": "given"}),
        "{said}"
    );
    assert!(!text(first).contains("AKIAIOSFODNN7EXAMPLE"), "{first}");
    assert_ne!(said["secret"], "", "{said}");

    // The argument rule.
    let denied = &calls[1];
    assert_eq!(denied["is_error"], true, "{denied}");
    assert_eq!(status(denied), "denied", "{denied}");
    assert!(text(denied).contains("no forbidden words"), "{denied}");

    // The budget: three calls, then every further one refused.
    let refused: Vec<&Value> = calls
        .iter()
        .skip(2)
        .filter(|c| text(c).contains("budget for this session is used up"))
        .collect();
    let ran = calls.iter().filter(|c| c["is_error"] == false).count();
    assert!(ran <= 3, "{calls:?}");
    assert!(!refused.is_empty(), "the budget stopped nothing: {calls:?}");
    let last = calls.last().expect("calls");
    assert!(
        text(last).contains("budget for this session is used up"),
        "{last}"
    );
}

#[test]
fn the_agent_loop_calls_an_mcp_server_tool_in_the_sandbox() {
    let ws = workspace();
    let policy = time_server_policy(ws.path(), "");
    let home = tempfile::tempdir().expect("tempdir");
    let assets = stack_runtime::assets::asset_dir().expect("asset folder");
    // A schema-file tool that has the name one of the server's tools would
    // get: that server tool is skipped with a warning, and the run goes on
    // (it once failed to start on the duplicate).
    let tools = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tools.path().join("taken.json"),
        r#"{"name": "time__convert_time", "description": "Holds the name.", "parameters": {"type": "object", "properties": {}}, "executor": {"type": "command", "argv": ["true"]}}"#,
    )
    .expect("schema file");
    // The real default model, made to call the server's tool (a named tool
    // choice), through the whole loop: validation, policy, the sandboxed
    // server, the result fed back.
    let output = Command::new(common::agent_binary())
        .arg("--tools")
        .arg(tools.path())
        .args(["--policy"])
        .arg(&policy)
        .arg("--workspace")
        .arg(ws.path())
        .args([
            "--tool-choice",
            "time__get_current_time",
            "--seed",
            "0",
            "--max-steps",
            "2",
            "--max-tokens",
            "96",
        ])
        .args(["run", "--json", "-p", "What time is it in Europe/Paris?"])
        // Transcripts go to a home of the test's own.
        .env("HOME", home.path())
        .env("STACK_RUNTIME_ASSETS", &assets)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("STACK_RUNTIME_TOOLS")
        .output()
        .expect("agent run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let finished: Vec<Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["event"] == "tool_finished")
        .collect();
    let call = finished
        .iter()
        .find(|event| event["name"] == "time__get_current_time")
        .unwrap_or_else(|| {
            panic!(
                "no call of the MCP tool finished:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("time__convert_time") && stderr.contains("taken"),
        "no warning of the skipped server tool: {stderr}"
    );
    // The server answered: a time, or its own complaint about the zone the
    // model chose; either way it ran, sandboxed, and its answer came back.
    let outcome = &call["outcome"];
    let answer = format!("{}{}", outcome["stdout"], outcome["error"]);
    assert!(
        outcome["status"] == "ok" || answer.to_lowercase().contains("timezone"),
        "{call}"
    );
}

/// `tests/clients/http_mcp_server.py` (the official Python SDK's
/// `MCPServer` over Streamable HTTP) on a free loopback port, refusing
/// requests without `token`; killed when dropped.
struct HttpMcpServer {
    child: Child,
    port: u16,
}

impl HttpMcpServer {
    fn start(token: &str) -> HttpMcpServer {
        let script = client_script().with_file_name("http_mcp_server.py");
        let mut child = Command::new(server_venv().join("venv/bin/python"))
            .arg(script)
            .env("MCP_TEST_TOKEN", token)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTP MCP server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("its port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("port: {line:?}"));
        HttpMcpServer { child, port }
    }
}

impl Drop for HttpMcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// #17: a Streamable HTTP MCP server (the official Python SDK's, with a
/// bearer token) is a tool source like a stdio one: its tools join as
/// `NAME__tool` with their schemas, arguments are validated against them,
/// the policy decides per tool, and the calls run on the server. The token
/// comes from the variable the policy names: a wrong one, or none, is a
/// clear error naming the server, and the policy itself refuses plaintext
/// http:// to another machine and a URL with credentials in it.
#[test]
fn an_http_mcp_server_is_a_tool_source_behind_the_same_gate() {
    let token = "test-token-7f3a";
    let server = HttpMcpServer::start(token);
    let ws = workspace();
    let policy = ws.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"extends = "default"

[mcp_servers.notes]
url = "http://127.0.0.1:{port}/mcp"
bearer_token_env = "NOTES_MCP_TOKEN"
decision = "allow"

[mcp_servers.notes.tools.shout]
decision = "deny"
reason = "no shouting here"
"#,
            port = server.port
        ),
    )
    .expect("policy");
    let run = |tool: &str, args: &str, token: Option<&str>| {
        let mut command = Command::new(common::agent_binary());
        command
            .args(["tool", "run", tool, "--args", args, "--policy"])
            .arg(&policy)
            .arg("--workspace")
            .arg(ws.path())
            .env_remove("NOTES_MCP_TOKEN");
        if let Some(token) = token {
            command.env("NOTES_MCP_TOKEN", token);
        }
        let output = command.output().expect("agent tool run");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let outcome: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        (outcome, stderr)
    };

    let (added, stderr) = run("notes__add", r#"{"a": 2, "b": 40}"#, Some(token));
    assert_eq!(added["status"], "ok", "{added} {stderr}");
    assert_eq!(
        added["stdout"].as_str().map(str::trim),
        Some("42"),
        "{added}"
    );
    let (invalid, stderr) = run("notes__add", r#"{"a": "two", "b": 1}"#, Some(token));
    assert_eq!(invalid["status"], "invalid", "{invalid} {stderr}");
    let (denied, stderr) = run("notes__shout", r#"{"text": "hi"}"#, Some(token));
    assert_eq!(denied["status"], "denied", "{denied} {stderr}");
    assert!(denied.to_string().contains("no shouting here"), "{denied}");
    // Requests of its own whose answers it never takes (it leaves their
    // POSTs hanging): the connection is closed at the bound, the call
    // fails saying why, and the answers do not pile up until the timeout.
    let (flooded, stderr) = run("notes__ping_flood", "{}", Some(token));
    assert_eq!(flooded["status"], "failed", "{flooded} {stderr}");
    assert!(
        flooded["error"]
            .as_str()
            .is_some_and(|e| e.contains("faster than it read the answers")),
        "{flooded} {stderr}"
    );

    // Without the right token the server is left out, and the user is told why.
    let (_, wrong) = run("notes__add", r#"{"a": 1, "b": 1}"#, Some("not-the-token"));
    assert!(
        wrong.contains("MCP server `notes`")
            && wrong.contains("refused the bearer token in `NOTES_MCP_TOKEN`"),
        "{wrong}"
    );
    let (_, unset) = run("notes__add", r#"{"a": 1, "b": 1}"#, None);
    assert!(
        unset.contains("`NOTES_MCP_TOKEN`, which is not set"),
        "{unset}"
    );
    // The key never shows: not the wrong one in its refusal, nor the right
    // one in a successful call's log, even at debug level.
    assert!(!wrong.contains("not-the-token"), "{wrong}");
    let debug = Command::new(common::agent_binary())
        .args([
            "tool",
            "run",
            "notes__add",
            "--args",
            r#"{"a": 1, "b": 2}"#,
            "--policy",
        ])
        .arg(&policy)
        .arg("--workspace")
        .arg(ws.path())
        .env("NOTES_MCP_TOKEN", token)
        .env("AGENT_LOG", "debug")
        .output()
        .expect("agent tool run");
    let logged = String::from_utf8_lossy(&debug.stderr);
    assert!(debug.status.success(), "{logged}");
    let ran: Value = serde_json::from_slice(&debug.stdout).unwrap_or(Value::Null);
    assert_eq!(
        ran["stdout"].as_str().map(str::trim),
        Some("3"),
        "the call did not run: {ran} {logged}"
    );
    assert!(
        !logged.contains(token),
        "the token reached the log: {logged}"
    );

    // `agent tool list` shows its tools as an MCP server's.
    let listed = Command::new(common::agent_binary())
        .args(["tool", "list", "--policy"])
        .arg(&policy)
        .arg("--workspace")
        .arg(ws.path())
        .env("NOTES_MCP_TOKEN", token)
        .output()
        .expect("agent tool list");
    let listing = String::from_utf8_lossy(&listed.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with("notes__add "))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains(" mcp "), "{line}");

    // The same server named in the user's config file instead joins every
    // CLI session, under the default policy here.
    let config_home = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(config_home.path().join("stack-runtime")).expect("mkdir");
    std::fs::write(
        config_home.path().join("stack-runtime/config.toml"),
        format!(
            "[mcp_servers.notes]\nurl = \"http://127.0.0.1:{}/mcp\"\nbearer_token_env = \"NOTES_MCP_TOKEN\"\ndecision = \"allow\"\n",
            server.port
        ),
    )
    .expect("config");
    let output = Command::new(common::agent_binary())
        .args([
            "tool",
            "run",
            "notes__add",
            "--args",
            r#"{"a": 20, "b": 22}"#,
        ])
        .arg("--workspace")
        .arg(ws.path())
        .env("XDG_CONFIG_HOME", config_home.path())
        .env("NOTES_MCP_TOKEN", token)
        .output()
        .expect("agent tool run");
    let from_config: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    assert_eq!(
        (
            from_config["status"].as_str(),
            from_config["stdout"].as_str()
        ),
        (Some("ok"), Some("42")),
        "{from_config} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // What the policy refuses when it is loaded.
    for (url, says) in [
        ("http://192.0.2.7:8000/mcp", "plaintext"),
        ("https://user:pw@example.com/mcp", "credentials"),
        ("ftp://127.0.0.1/mcp", "scheme"),
    ] {
        let bad = ws.path().join("bad.toml");
        std::fs::write(&bad, format!("[mcp_servers.far]\nurl = \"{url}\"\n")).expect("write");
        let output = Command::new(common::agent_binary())
            .args(["tool", "list", "--policy"])
            .arg(&bad)
            .arg("--workspace")
            .arg(ws.path())
            .output()
            .expect("agent tool list");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url}: {stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
    }
}
