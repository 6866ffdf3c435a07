//! The `agent tool` CLI contract, run against the real binary and real files.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn agent(args: &[&str], workspace: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .current_dir(workspace)
        .env_remove("STACK_RUNTIME_TOOLS")
        .output()
        .expect("run agent")
}

/// Runs `agent tool run`, checks the one-object contract, returns the object.
fn tool_run(workspace: &Path, name: &str, args: &str, extra: &[&str]) -> Value {
    let mut argv = vec!["tool", "run", name, "--args", args];
    argv.extend_from_slice(extra);
    let output = agent(&argv, workspace);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf8");
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one line of JSON: {stdout}"
    );
    let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
    // Keys that appear only when they say something: the signal and the
    // limit that ended a call, its egress decisions, its disk use.
    const OPTIONAL: [&str; 4] = ["disk", "egress", "limit", "signal"];
    let mut keys: Vec<&str> = report
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .filter(|key| !OPTIONAL.contains(key))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "duration_ms",
            "error",
            "exit_code",
            "status",
            "stderr",
            "stdout",
            "tool",
            "truncated"
        ]
    );
    assert_eq!(report["tool"], name);
    assert!(report["duration_ms"].is_u64());
    report
}

#[test]
fn tool_list_shows_every_builtin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = agent(&["tool", "list"], dir.path());
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for name in [
        "execute_code",
        "read_file",
        "write_file",
        "list_dir",
        "search_files",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("builtin")),
            "{name} in {text}"
        );
    }
    let output = agent(&["tool", "list", "--json"], dir.path());
    let tools: Value = serde_json::from_slice(&output.stdout).expect("json");
    let tools = tools.as_array().expect("array");
    assert!(tools.len() >= 5);
    assert!(tools
        .iter()
        .all(|t| t["type"] == "function" && t["function"]["parameters"]["type"] == "object"));
}

#[test]
fn tool_schema_prints_the_openai_definition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = agent(&["tool", "schema", "execute_code"], dir.path());
    assert!(output.status.success());
    let schema: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(schema["function"]["name"], "execute_code");
    assert_eq!(
        schema["function"]["parameters"]["properties"]["language"]["enum"],
        serde_json::json!(["python", "javascript", "bash"])
    );
    let output = agent(&["tool", "schema", "reed_file"], dir.path());
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("Did you mean `read_file`?"));
}

#[test]
fn read_and_write_files_in_the_workspace() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "one\ntwo\nthree\n").expect("write");
    let report = tool_run(dir.path(), "read_file", r#"{"path": "notes.txt"}"#, &[]);
    assert_eq!(report["status"], "ok");
    assert_eq!(report["stdout"], "one\ntwo\nthree\n");
    assert_eq!(report["exit_code"], Value::Null);
    assert_eq!(report["error"], Value::Null);
    assert_eq!(report["truncated"], false);

    let report = tool_run(
        dir.path(),
        "read_file",
        r#"{"path": "notes.txt", "start_line": 2, "line_count": 1}"#,
        &[],
    );
    assert_eq!(report["stdout"], "two\n");

    let other = tempfile::tempdir().expect("tempdir");
    let workspace = other.path().to_str().expect("utf8");
    let report = tool_run(
        dir.path(),
        "write_file",
        r#"{"path": "sub/out.txt", "content": "hello"}"#,
        &["--workspace", workspace],
    );
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(
        std::fs::read_to_string(other.path().join("sub/out.txt")).expect("written"),
        "hello"
    );

    let report = tool_run(other.path(), "search_files", r#"{"pattern": "h.l+o"}"#, &[]);
    assert_eq!(report["stdout"], "sub/out.txt:1: hello\n");
    let report = tool_run(other.path(), "list_dir", "{}", &[]);
    assert_eq!(report["stdout"], "sub/\n");
}

/// Red-team M2, M3, L4 and L6: hostile files that sandboxed code can make
/// in the workspace. A FIFO is refused by name instead of hanging the
/// file tools; thousands of hard links and folders cost `search_files` a
/// bounded walk that holds few descriptors (here under `ulimit -n 256`);
/// and names with control characters cannot forge result lines.
#[test]
fn hostile_workspace_files_neither_hang_nor_forge_the_file_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = dir.path();
    nix::unistd::mkfifo(
        &ws.join("notes.txt"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo");
    for (tool, args) in [
        ("read_file", r#"{"path": "notes.txt"}"#),
        ("read_file", r#"{"path": "notes.txt", "start_line": 1}"#),
        ("write_file", r#"{"path": "notes.txt", "content": "x"}"#),
    ] {
        let report = tool_run(ws, tool, args, &[]);
        assert_eq!(report["status"], "failed", "{tool}: {report}");
        assert!(
            report["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not a regular file"),
            "{tool}: {report}"
        );
    }
    std::fs::remove_file(ws.join("notes.txt")).expect("rm fifo");

    std::fs::write(ws.join("evil\nname.txt"), "needle \x1b]0;pwned\x07\n").expect("write");
    let listed = tool_run(ws, "list_dir", "{}", &[]);
    assert_eq!(
        listed["stdout"], "evil\\nname.txt  (18 bytes)\n",
        "{listed}"
    );
    let found = tool_run(ws, "search_files", r#"{"pattern": "needle"}"#, &[]);
    assert_eq!(
        found["stdout"], "evil\\nname.txt:1: needle \\x1b]0;pwned\\x07\n",
        "{found}"
    );
    std::fs::remove_file(ws.join("evil\nname.txt")).expect("rm");

    // 10,000 names of one file and 5,000 folders, searched with few fds.
    std::fs::write(ws.join("big.txt"), "needle\n".repeat(100_000)).expect("write");
    std::fs::create_dir(ws.join("links")).expect("mkdir");
    for i in 0..10_000 {
        std::fs::hard_link(ws.join("big.txt"), ws.join(format!("links/{i}.txt"))).expect("link");
    }
    for i in 0..5_000 {
        std::fs::create_dir_all(ws.join(format!("wide/d{i}"))).expect("mkdir");
    }
    std::fs::write(ws.join("wide/d4999/last.txt"), "needle at the end\n").expect("write");
    let output = Command::new("sh")
        .arg("-c")
        .arg(
            r#"ulimit -n 256 && exec "$0" tool run search_files --args '{"pattern": "needle at"}'"#,
        )
        .arg(env!("CARGO_BIN_EXE_agent"))
        .current_dir(ws)
        .env_remove("STACK_RUNTIME_TOOLS")
        .output()
        .expect("run agent");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(
        report["stdout"], "wide/d4999/last.txt:1: needle at the end\n",
        "{report}"
    );
}

#[test]
fn invalid_calls_report_invalid_and_run_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "write_file",
            r#"{"path": "x.txt"}"#,
            "required property `content`",
        ),
        (
            "write_file",
            r#"{"path": "x.txt", "content": 5}"#,
            "`/content`",
        ),
        (
            "write_file",
            r#"{"path": "x.txt", "content": "a""#,
            "not valid JSON",
        ),
        (
            "wipe_disk",
            r#"{"path": "x.txt"}"#,
            "unknown tool `wipe_disk`",
        ),
    ];
    for (tool, args, message) in cases {
        let report = tool_run(dir.path(), tool, args, &[]);
        assert_eq!(report["status"], "invalid", "{report}");
        assert!(
            report["error"].as_str().unwrap_or("").contains(message),
            "{report}"
        );
    }
    assert!(
        !dir.path().join("x.txt").exists(),
        "an invalid call wrote a file"
    );
}

#[test]
fn paths_outside_the_workspace_fail_without_leaking() {
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret"), "hunter2").expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link"))
        .expect("symlink");
    let secret = outside.path().join("secret");
    let secret = secret.to_str().expect("utf8");
    for path in [
        secret,
        "link",
        "../../../../../../etc/shadow",
        "/etc/shadow",
    ] {
        let args = serde_json::json!({ "path": path }).to_string();
        let report = tool_run(dir.path(), "read_file", &args, &[]);
        assert_eq!(report["status"], "failed", "{path}: {report}");
        assert!(!report.to_string().contains("hunter2"));
    }
    let args = serde_json::json!({ "path": "link", "content": "pwned" }).to_string();
    assert_eq!(
        tool_run(dir.path(), "write_file", &args, &[])["status"],
        "failed"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).expect("read"),
        "hunter2"
    );
}

#[test]
fn execute_code_runs_in_the_process_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = tool_run(
        dir.path(),
        "execute_code",
        r#"{"code": "import os\nprint(6 * 7, os.getuid() != 0)", "language": "python"}"#,
        &[],
    );
    assert_eq!(
        (report["status"].as_str(), report["stdout"].as_str()),
        (Some("ok"), Some("42 True\n")),
        "{report}"
    );
    assert_eq!(report["exit_code"], 0);
    let report = tool_run(
        dir.path(),
        "execute_code",
        r#"{"code": "echo out; echo err >&2; exit 3", "language": "bash"}"#,
        &["--sandbox", "process"],
    );
    assert_eq!(report["status"], "failed");
    assert_eq!(report["exit_code"], 3);
    assert_eq!(
        (report["stdout"].as_str(), report["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
}

/// A policy's disk budget through the CLI: a call that writes past
/// `disk_mb` is stopped by `ENOSPC`, reports `limit = "disk"` and what it
/// used, and the workspace keeps no more than the budget.
#[test]
fn a_policy_disk_budget_holds_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("budget.toml");
    std::fs::write(
        &policy,
        "[sandbox]\nbackend = \"process\"\ndisk_mb = 4\nmax_files = 100\n",
    )
    .expect("write policy");
    let workspace = dir.path().join("ws");
    std::fs::create_dir(&workspace).expect("mkdir");
    let policy_arg = policy.display().to_string();
    let report = tool_run(
        &workspace,
        "execute_code",
        r#"{"code": "head -c 50000000 /dev/zero > big; echo done", "language": "bash"}"#,
        &["--policy", &policy_arg, "--yes"],
    );
    assert_eq!(report["status"], "killed", "{report}");
    assert_eq!(report["limit"], "disk", "{report}");
    assert!(
        report["disk"]["bytes"]
            .as_u64()
            .is_some_and(|b| b <= 4 << 20),
        "{report}"
    );
    let size = std::fs::metadata(workspace.join("big"))
        .expect("stat")
        .len();
    assert!(size <= 4 << 20, "the workspace kept {size} bytes");
    let report = tool_run(
        &workspace,
        "execute_code",
        r#"{"code": "for i in $(seq 1 500); do : > f$i || exit 9; done", "language": "bash"}"#,
        &["--policy", &policy_arg, "--yes"],
    );
    assert_eq!(report["limit"], "disk", "{report}");
    let names = std::fs::read_dir(&workspace).expect("read_dir").count();
    assert!(names <= 101, "{names} names in the workspace");
}

/// Red-team L1: every CLI call used to leave its memory and pids cgroups
/// behind (their clean-up ran on a thread the exiting process never waited
/// for). After 100 calls, none of those processes' cgroups is left.
#[test]
fn as_root_no_cgroup_outlives_the_cli_calls_that_made_it() {
    use stack_runtime::sandbox::process::CgroupLayout;
    let layout = CgroupLayout::detect().expect("as root, a writable cgroup hierarchy is there");
    let parents = match &layout {
        CgroupLayout::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
        CgroupLayout::V2 { parent } => vec![parent.clone()],
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pids = Vec::new();
    for _ in 0..100 {
        let child = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args([
                "tool",
                "run",
                "execute_code",
                "--sandbox",
                "process",
                "--args",
            ])
            .arg(r#"{"code": "true", "language": "bash"}"#)
            .current_dir(dir.path())
            .env_remove("STACK_RUNTIME_TOOLS")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run agent");
        pids.push(child.id());
        let output = child.wait_with_output().expect("agent ran");
        let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
        assert_eq!(report["status"], "ok", "{report}");
    }
    let left: Vec<String> = parents
        .iter()
        .flat_map(|parent| std::fs::read_dir(parent).expect("cgroup parent").flatten())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            pids.iter()
                .any(|pid| name.starts_with(&format!("stack-runtime-{pid}-")))
        })
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[test]
fn agent_doctor_reports_the_kernel_guarantees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = agent(&["doctor", "--json"], dir.path());
    let report: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        report["probe"]["landlock_abi"].as_i64().map(|abi| abi >= 1),
        Some(true),
        "{report}"
    );
    assert_eq!(report["process_sandbox_ready"], output.status.success());
    let guarantees = report["guarantees"].as_array().expect("guarantees");
    assert!(guarantees
        .iter()
        .any(|g| g["name"].as_str().is_some_and(|n| n.contains("seccomp"))));
}

/// `agent doctor` at each landlock tier, forced down with
/// `STACK_RUNTIME_LANDLOCK_ABI`: the tier, what holds each guarantee
/// (landlock, or the compensating control), and whether calls run; and
/// `agent tool run` at that tier, which runs or refuses accordingly.
#[test]
fn agent_doctor_states_each_tier_and_calls_follow_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doctor = |abi: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["doctor", "--json"])
            .current_dir(dir.path())
            .env("STACK_RUNTIME_LANDLOCK_ABI", abi)
            .output()
            .expect("agent doctor");
        let report: Value = serde_json::from_slice(&output.stdout).expect("json");
        (output.status.success(), report)
    };
    let detail = |report: &Value, name: &str| -> String {
        report["guarantees"]
            .as_array()
            .expect("guarantees")
            .iter()
            .find(|g| g["name"].as_str().is_some_and(|n| n.contains(name)))
            .map(|g| format!("{} {}", g["holds"], g["detail"]))
            .unwrap_or_else(|| panic!("no guarantee {name}: {report}"))
    };
    let (ready, report) = doctor("4");
    assert!(ready, "{report}");
    assert_eq!(report["probe"]["tier"], "no_scoping", "{report}");
    assert_eq!(report["probe"]["landlock_abi"], 4);
    assert!(
        detail(&report, "TCP").starts_with("true \"landlock ABI 4"),
        "{report}"
    );
    assert!(
        detail(&report, "scoped").starts_with("true \"compensated"),
        "{report}"
    );
    let (ready, report) = doctor("2");
    assert!(ready, "{report}");
    assert_eq!(report["probe"]["tier"], "minimal", "{report}");
    assert!(
        detail(&report, "TCP").starts_with("true \"compensated"),
        "{report}"
    );
    assert!(
        detail(&report, "truncating").starts_with("true \"compensated"),
        "{report}"
    );
    let (ready, report) = doctor("0");
    assert!(!ready, "{report}");
    assert_eq!(report["probe"]["tier"], "unsupported", "{report}");
    assert!(
        detail(&report, "filesystem").starts_with("false"),
        "{report}"
    );
    // Calls follow the tier: they run at ABI 2, and are refused with the
    // reason with no landlock at all.
    for (abi, want) in [("2", "ok"), ("0", "error")] {
        let output = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["tool", "run", "execute_code", "--yes", "--args"])
            .arg(r#"{"code": "print(6 * 7)", "language": "python"}"#)
            .current_dir(dir.path())
            .env("STACK_RUNTIME_LANDLOCK_ABI", abi)
            .output()
            .expect("agent tool run");
        let report: Value = serde_json::from_slice(&output.stdout).expect("json");
        assert_eq!(report["status"], want, "ABI {abi}: {report}");
        if want == "error" {
            assert!(
                report["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("landlock")),
                "{report}"
            );
        }
    }
}

#[test]
fn a_policy_that_cannot_be_loaded_runs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = tool_run(
        dir.path(),
        "write_file",
        r#"{"path": "x", "content": "y"}"#,
        &["--policy", "no-such-policy.toml"],
    );
    assert_eq!(report["status"], "error");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("no-such-policy.toml"),
        "{report}"
    );
    assert!(!dir.path().join("x").exists());
}

#[test]
fn extra_tool_folders_load_and_broken_files_warn_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mixed = common::fixture("tools/mixed");
    let output = agent(
        &["--tools", mixed.to_str().expect("utf8"), "tool", "list"],
        dir.path(),
    );
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("get_weather") && stdout.contains("to_upper"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad_syntax.json:5:1: trailing comma"),
        "{stderr}"
    );
    let report = tool_run(
        dir.path(),
        "get_weather",
        r#"{"city": "Oslo", "unit": "kelvin"}"#,
        &["--tools", mixed.to_str().expect("utf8")],
    );
    assert_eq!(report["status"], "invalid");
}

/// Regression (#15): `--no-default-tools` still offered the five built-ins.
/// Now it offers only the tools the user brings.
#[test]
fn no_default_tools_offers_only_your_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mixed = common::fixture("tools/mixed");
    let mixed = mixed.to_str().expect("utf8");
    let names = |args: &[&str]| -> Vec<String> {
        let output = agent(args, dir.path());
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let everything = names(&["tool", "list"]);
    assert!(
        everything.iter().any(|n| n == "read_file"),
        "{everything:?}"
    );
    assert!(
        everything.iter().any(|n| n == "unit_convert"),
        "{everything:?}"
    );
    assert_eq!(
        names(&["--no-default-tools", "tool", "list"]),
        Vec::<String>::new()
    );
    let own = names(&["--no-default-tools", "--tools", mixed, "tool", "list"]);
    assert!(own.iter().any(|n| n == "get_weather"), "{own:?}");
    for builtin in [
        "read_file",
        "write_file",
        "list_dir",
        "search_files",
        "execute_code",
    ] {
        assert!(
            !own.iter().any(|n| n == builtin),
            "{builtin} offered: {own:?}"
        );
    }
    assert!(!own.iter().any(|n| n == "unit_convert"), "{own:?}");
    let report = tool_run(
        dir.path(),
        "read_file",
        r#"{"path": "x"}"#,
        &["--no-default-tools"],
    );
    assert_eq!(report["status"], "invalid", "{report}");
}

/// Regression (#15): log lines carried colour codes into files and pipes.
/// `agent run` with the default model, logs on, stderr not a terminal; also
/// `--system` and `--no-default-tools` shrink the prompt to the user's own.
#[test]
fn logs_to_a_pipe_are_plain_and_the_system_prompt_is_the_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| -> (Value, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(args)
            .args([
                "--temperature",
                "0",
                "--max-tokens",
                "4",
                "--policy",
                "strict",
                "run",
                "-p",
                "Hi.",
                "--json",
            ])
            .current_dir(dir.path())
            .env("AGENT_LOG", "info")
            .env_remove("NO_COLOR")
            .output()
            .expect("agent run");
        assert!(output.status.success(), "{output:?}");
        (
            common::turn_finished(&String::from_utf8_lossy(&output.stdout)),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (default, stderr) = run(&[]);
    assert!(stderr.contains("llama"), "the log was on: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "escape codes on a pipe: {stderr:?}"
    );
    let (own, _) = run(&["--no-default-tools", "--system", "Answer in one word."]);
    let prompt = |finished: &Value| {
        finished["counters"]["prompt_evaluated"]
            .as_u64()
            .expect("counters")
    };
    assert!(prompt(&own) < 40, "{own}");
    assert!(
        prompt(&default) > 500,
        "the built-ins' schemas are in the default prompt: {default}"
    );
}

#[test]
fn usage_errors_exit_nonzero_without_a_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = agent(&["tool", "run"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let output = agent(
        &["tool", "run", "list_dir", "--sandbox", "docker"],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
}

/// Moved from the sandbox crate's escape suite: the runtime's own
/// environment (API keys, tokens) never reaches sandboxed code, through the
/// CLI as users run it.
#[test]
fn secrets_in_the_runtime_environment_never_reach_the_child() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let secret_env = [
        ("OPENAI_API_KEY", "sk-LEAK-1"),
        ("GITHUB_TOKEN", "ghp_LEAK-2"),
        ("AWS_SECRET_ACCESS_KEY", "LEAK-3"),
        ("MY_PASSWORD", "LEAK-4"),
    ];
    for (language, code) in [
        ("python", "import os\nprint(sorted(os.environ.items()))"),
        ("bash", "env; set"),
    ] {
        let args = serde_json::json!({"code": code, "language": language}).to_string();
        let output = std::process::Command::new(common::agent_binary())
            .args([
                "tool",
                "run",
                "execute_code",
                "--args",
                &args,
                "--workspace",
            ])
            .arg(workspace.path())
            .envs(secret_env)
            .output()
            .expect("run agent");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        assert_eq!(report["status"], "ok", "{report}");
        let text = report.to_string();
        assert!(!text.contains("LEAK"), "{language}: {text}");
        assert!(
            text.contains("PATH"),
            "{language}: the allowlisted PATH is set"
        );
    }
}

/// Script tools run through the CLI, validated against their schema file,
/// as users call them (the sandbox crate tests the WASI side alone).
#[test]
fn script_tools_run_through_the_cli_validated_against_their_schema() {
    let workspace = tempfile::tempdir().expect("tempdir");
    // Through the CLI, validated against the schema file, as users call it.
    let output = std::process::Command::new(common::agent_binary())
        .args([
            "tool",
            "run",
            "unit_convert",
            "--args",
            r#"{"value": 100, "from": "C", "to": "F"}"#,
        ])
        .current_dir(workspace.path())
        .output()
        .expect("agent");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        report["stdout"], "{\"value\":212,\"unit\":\"F\"}\n",
        "{report}"
    );
    let invalid = std::process::Command::new(common::agent_binary())
        .args([
            "tool",
            "run",
            "unit_convert",
            "--args",
            r#"{"value": 1, "from": "C", "to": "parsec"}"#,
        ])
        .current_dir(workspace.path())
        .output()
        .expect("agent");
    let report: serde_json::Value = serde_json::from_slice(&invalid.stdout).expect("json");
    assert_eq!(report["status"], "invalid");
}

/// `kill -9` of the runtime right after a call finished: the call's
/// transcript message and its audit records (decision and result) are on
/// file, because both are written before the host is told it finished.
#[test]
fn a_finished_calls_records_survive_kill_9_of_the_runtime() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let home = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("notes.txt"), "buy milk").expect("write");
    let assets = stack_runtime::assets::asset_dir().expect("asset folder");
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "--tool-choice",
            "list_dir",
            "--temperature",
            "0",
            "--max-steps",
            "3",
            "--max-tokens",
            "96",
        ])
        .args([
            "run",
            "--json",
            "--yes",
            "-p",
            "Call list_dir with path \".\".",
        ])
        .current_dir(workspace.path())
        .env("HOME", home.path())
        .env("STACK_RUNTIME_ASSETS", &assets)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("STACK_RUNTIME_TOOLS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    let stdout = child.stdout.take().expect("stdout");
    let mut finished = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["event"] == "tool_finished" {
            // At once, as a crash would.
            child.kill().expect("kill -9");
            finished = event["id"].as_str().map(str::to_string);
            break;
        }
    }
    let status = child.wait().expect("wait");
    let id = finished.expect("a call finished before the kill");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let sessions = home.path().join(".local/share/stack-runtime/sessions");
    let transcripts: Vec<String> = std::fs::read_dir(&sessions)
        .expect("sessions folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .map(|p| std::fs::read_to_string(p).expect("read"))
        .collect();
    assert_eq!(transcripts.len(), 1, "one session transcript");
    let tool_message = transcripts[0]
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|m| m["role"] == "tool" && m["tool_call_id"] == id.as_str());
    assert!(
        tool_message.is_some(),
        "the tool message of {id} is in the transcript: {}",
        transcripts[0]
    );
    let audit = std::fs::read_to_string(sessions.join("audit/audit.jsonl")).expect("audit log");
    let records: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Value| r["call_id"] == id.as_str())
        .collect();
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(kinds, ["decision", "result"], "{audit}");
}

/// A policy file under `tests/fixtures/policies`.
fn policy_fixture(name: &str) -> std::path::PathBuf {
    common::fixture(&format!("policies/{name}"))
}

#[test]
fn agent_policy_check_and_explain() {
    let bin = env!("CARGO_BIN_EXE_agent");
    let ok = std::process::Command::new(bin)
        .args(["policy", "check"])
        .arg(policy_fixture("over_user.toml"))
        .output()
        .expect("run");
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("preset:default"));
    let bad = std::process::Command::new(bin)
        .args(["policy", "check"])
        .arg(policy_fixture("bad_unknown_key.toml"))
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("bad_unknown_key.toml:4: unknown field `decison`"));
    let explain = std::process::Command::new(bin)
        .args(["policy", "explain"])
        .arg(policy_fixture("user.toml"))
        .args([
            "--tool",
            "execute_code",
            "--args",
            r#"{"code": "print(1)", "language": "python"}"#,
        ])
        .output()
        .expect("run");
    let report: Value = serde_json::from_slice(&explain.stdout).expect("json");
    assert_eq!(report["decision"], "ask");
    assert_eq!(report["rule"], "tools.execute_code");
    assert_eq!(report["sandbox"]["memory_mb"], 256);
    assert_eq!(report["process_limits"]["memory_bytes"], 256u64 << 20);
    assert_eq!(report["network"], "loopback");
}

#[test]
fn tool_run_obeys_a_policy_fully() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = dir.path();
    let write = r#"{"path": "a.txt", "content": "x"}"#;
    assert_eq!(
        tool_run(ws, "write_file", write, &["--policy", "default"])["status"],
        "denied",
        "ask without --yes"
    );
    assert_eq!(
        tool_run(ws, "write_file", write, &["--policy", "default", "--yes"])["status"],
        "ok"
    );
    let git = r#"{"path": ".git/x", "content": "x"}"#;
    assert_eq!(
        tool_run(ws, "write_file", git, &["--policy", "default", "--yes"])["status"],
        "denied",
        "--yes never overrides deny"
    );
    let code = r#"{"code": "echo hi", "language": "bash"}"#;
    let strict = tool_run(ws, "execute_code", code, &["--policy", "strict", "--yes"]);
    assert_eq!(strict["status"], "denied", "{strict}");
}

/// A one-request-at-a-time HTTP server on `address` for the egress test:
/// answers `hello from NAME`, and counts requests.
fn test_site(
    address: &str,
    name: &'static str,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((address, 0)).expect("bind a test site");
    let port = listener.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = format!("hello from {name}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, hits)
}

/// A policy's network allowlist through the CLI: `agent tool run` reaches
/// the allowed host through the egress proxy and is refused the denied
/// one, the result and the audit log say which rule decided, and `agent
/// policy explain --host` gives the same decisions.
#[test]
fn network_allowlists_are_enforced_audited_and_explained_by_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (allowed_port, allowed_hits) = test_site("127.0.0.2", "allowed");
    let (denied_port, denied_hits) = test_site("127.0.0.3", "denied");
    let policy = dir.path().join("egress.toml");
    std::fs::write(
        &policy,
        r#"extends = "default"
[sandbox]
network = { allow = ["allowed.test", "127.0.0.2", "127.0.0.3"], deny = ["denied.test"], hosts = { "allowed.test" = "127.0.0.2", "denied.test" = "127.0.0.3" } }
"#,
    )
    .expect("write policy");
    let audit = dir.path().join("audit.jsonl");
    let code = format!(
        "curl -sSf http://allowed.test:{allowed_port}/; curl -sSf http://denied.test:{denied_port}/; true"
    );
    let args = serde_json::json!({"language": "bash", "code": code}).to_string();
    let output = agent(
        &[
            "tool",
            "run",
            "execute_code",
            "--args",
            &args,
            "--policy",
            policy.to_str().expect("utf8"),
            "--yes",
            "--audit-log",
            audit.to_str().expect("utf8"),
        ],
        dir.path(),
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(report["status"], "ok", "{report}");
    assert_eq!(report["stdout"], "hello from allowed\n", "{report}");
    let egress = report["egress"].as_array().expect("egress records");
    let decided: Vec<(&str, &str, &str)> = egress
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap_or(""),
                r["decision"].as_str().unwrap_or(""),
                r["rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        decided,
        [
            ("allowed.test", "allowed", "allow allowed.test"),
            ("denied.test", "refused", "deny denied.test"),
        ]
    );
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(denied_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The audit log has both, with host, address, rule and bytes.
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Value| r["event"] == "egress")
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["address"], "127.0.0.2");
    assert!(records[0]["bytes_in"].as_u64().unwrap_or(0) > 0);
    assert_eq!(records[1]["rule"], "deny denied.test");
    assert_eq!(records[1]["decision"], "refused");
    // `policy explain --host` decides the same way.
    for (host, decision, rule) in [
        ("denied.test", "refused", "deny denied.test"),
        ("allowed.test:80", "allowed", "allow allowed.test"),
        ("elsewhere.test", "refused", "not on the allow list"),
    ] {
        let explain = agent(
            &[
                "policy",
                "explain",
                policy.to_str().expect("utf8"),
                "--host",
                host,
            ],
            dir.path(),
        );
        let report: Value = serde_json::from_slice(&explain.stdout).expect("json");
        assert_eq!(report["decision"], decision, "{host}: {report}");
        assert_eq!(report["rule"], rule, "{host}: {report}");
    }
}

/// `agent sessions` list, training consent, delete and purge, and `agent
/// export` refusing a session whose owner did not allow training use, on
/// real files under a scratch home folder.
#[test]
fn sessions_are_listed_consented_deleted_and_purged_by_the_cli() {
    let home = tempfile::tempdir().expect("home");
    let sessions = home.path().join(".local/share/stack-runtime/sessions");
    std::fs::create_dir_all(sessions.join("history")).expect("mkdir");
    for id in ["s-old", "s-new"] {
        std::fs::write(
            sessions.join(format!("{id}.jsonl")),
            format!("{{\"role\":\"user\",\"content\":\"PROMPT-{id}\"}}\n"),
        )
        .expect("transcript");
        std::fs::write(sessions.join("history").join(id), format!("PROMPT-{id}\n")).expect("h");
    }
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400);
    for file in [sessions.join("s-old.jsonl"), sessions.join("history/s-old")] {
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(old))
            .expect("mtime");
    }
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(args)
            .env("HOME", home.path())
            .env_remove("XDG_DATA_HOME")
            .output()
            .expect("agent")
    };
    let listed = String::from_utf8(run(&["sessions"]).stdout).expect("utf8");
    assert!(
        listed.contains("s-old") && listed.contains("s-new"),
        "{listed}"
    );
    assert!(listed.contains("training not allowed"), "{listed}");
    // Export waits for consent.
    let refused = run(&["export", "s-new"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("has not allowed its use as training data"));
    assert!(run(&["sessions", "training", "s-new", "allow"])
        .status
        .success());
    let exported = run(&["export", "s-new"]);
    assert!(exported.status.success());
    assert!(String::from_utf8_lossy(&exported.stdout).contains("PROMPT-s-new"));
    // Purge by age takes only the old one.
    let purged = run(&["sessions", "purge", "--older-than", "7"]);
    assert!(purged.status.success());
    assert!(String::from_utf8_lossy(&purged.stdout).contains("purged 1 session(s)"));
    assert!(!sessions.join("s-old.jsonl").exists());
    assert!(!sessions.join("history/s-old").exists());
    assert!(sessions.join("s-new.jsonl").exists());
    // Delete takes the rest of a session; the audit log says so.
    let deleted = run(&["sessions", "delete", "s-new"]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!sessions.join("s-new.jsonl").exists());
    assert!(!sessions.join("s-new.consent.json").exists());
    assert!(!sessions.join("history/s-new").exists());
    let audit = std::fs::read_to_string(sessions.join("audit/audit.jsonl")).expect("audit");
    assert!(audit.contains("\"removal\":\"delete\""), "{audit}");
    assert!(!audit.contains("PROMPT"), "{audit}");
    let missing = run(&["sessions", "delete", "s-new"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no saved session `s-new`"));
}

/// A private session bus with a real Secret Service on it
/// (gnome-keyring-daemon, its login keyring made and unlocked under
/// `home`), killed on drop.
struct SessionKeyring {
    address: String,
    bus: std::process::Child,
    keyring: Option<std::process::Child>,
}

impl SessionKeyring {
    fn start(home: &Path) -> SessionKeyring {
        use std::io::{BufRead, Write};
        let run = home.join("run");
        std::fs::create_dir_all(&run).expect("runtime dir");
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        let mut bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", run.join("bus").display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon (scripts/setup installs dbus)");
        let stdout = bus.stdout.take().expect("stdout");
        // The guard from here on: a failed start leaves no daemon behind.
        let mut session = SessionKeyring {
            address: String::new(),
            bus,
            keyring: None,
        };
        std::io::BufReader::new(stdout)
            .read_line(&mut session.address)
            .expect("the bus address");
        session.address = session.address.trim().to_string();
        assert!(session.address.starts_with("unix:"), "{}", session.address);
        let keyring = session.keyring.insert(
            Command::new("gnome-keyring-daemon")
                .args(["--foreground", "--unlock", "--components=secrets"])
                .env("DBUS_SESSION_BUS_ADDRESS", &session.address)
                .env("HOME", home)
                .env("XDG_DATA_HOME", home.join("share"))
                .env("XDG_RUNTIME_DIR", &run)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("gnome-keyring-daemon (scripts/setup installs gnome-keyring)"),
        );
        // The login keyring's password; closing stdin lets it go on.
        let mut password = keyring.stdin.take().expect("stdin");
        password
            .write_all(b"test-login-password")
            .expect("password");
        drop(password);
        // Wait until it owns the Secret Service's name (a call before that
        // would start another daemon, one with no unlocked keyring), then
        // until its login collection takes a secret and gives it back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let owned = Command::new("dbus-send")
                .args([
                    "--session",
                    "--print-reply",
                    "--dest=org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus.NameHasOwner",
                    "string:org.freedesktop.secrets",
                ])
                .env("DBUS_SESSION_BUS_ADDRESS", &session.address)
                .output()
                .expect("dbus-send");
            if String::from_utf8_lossy(&owned.stdout).contains("boolean true")
                && session.store("probe", "ready")
                && session.lookup_in("probe", "probe").as_deref() == Some("ready")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the Secret Service never came up on {}",
                session.address
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        session
    }

    /// Stores `secret` as service `probe`, user `user` (secret-tool, the
    /// Secret Service's own client).
    fn store(&self, user: &str, secret: &str) -> bool {
        use std::io::Write;
        let mut store = Command::new("secret-tool")
            .args([
                "store",
                "--label=probe",
                "service",
                "probe",
                "username",
                user,
            ])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("secret-tool (scripts/setup installs libsecret-tools)");
        let mut input = store.stdin.take().expect("stdin");
        let _ = input.write_all(secret.as_bytes());
        drop(input);
        store.wait().is_ok_and(|status| status.success())
    }

    /// What the keyring holds for `service` and `user`, if anything.
    fn lookup_in(&self, service: &str, user: &str) -> Option<String> {
        let output = Command::new("secret-tool")
            .args(["lookup", "service", service, "username", user])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .output()
            .expect("secret-tool (scripts/setup installs libsecret-tools)");
        let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        (output.status.success() && !text.is_empty()).then_some(text)
    }

    /// What the keyring holds for the runtime's entry `user`, if anything.
    fn lookup(&self, user: &str) -> Option<String> {
        self.lookup_in("stack-runtime", user)
    }
}

impl Drop for SessionKeyring {
    fn drop(&mut self) {
        for child in self.keyring.iter_mut().chain([&mut self.bus]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// #21, "the key comes from the OS keyring where one exists": with a real
/// Secret Service on the session bus, the first encrypted session's key is
/// made in the keyring, not in a file (the folder keeps only a marker);
/// files are sealed with it and read back through it; `agent keys rotate`
/// moves to a new key in the keyring and keeps the old one there; and
/// without the keyring (no session bus) the CLI says where the keys are
/// and changes nothing, making no key file beside them.
#[test]
fn keys_live_in_the_os_keyring_where_one_answers() {
    use stack_runtime::seal::record::sealed_with;
    use stack_runtime::seal::Key;
    let home = tempfile::tempdir().expect("home");
    let config = home.path().join(".config");
    let sessions = home.path().join("data");
    let keys = config.join("stack-runtime/keys");
    let policy = home.path().join("sealed.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"default\"\n[privacy]\nkeep_transcripts = true\ntranscript_dir = \"{}\"\nencrypt = true\n",
            sessions.display()
        ),
    )
    .expect("policy");
    let keyring = SessionKeyring::start(home.path());
    let assets = stack_runtime::assets::asset_dir().expect("asset folder");
    let agent = |args: &[&str], bus: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agent"));
        command
            .args(["--policy", policy.to_str().expect("utf8")])
            .args(args)
            .current_dir(home.path())
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", &config)
            .env("STACK_RUNTIME_ASSETS", &assets)
            .env_remove("STACK_RUNTIME_KEY")
            .env_remove("STACK_RUNTIME_KEYRING")
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
        if let Some(address) = bus {
            command.env("DBUS_SESSION_BUS_ADDRESS", address);
        }
        command.output().expect("agent")
    };
    let bus = Some(keyring.address.as_str());
    let ran = agent(
        &[
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "run",
            "-p",
            "Say PROMPT-keyring.",
        ],
        bus,
    );
    assert!(ran.status.success(), "{ran:?}");
    // The key is in the keyring; the folder holds the marker, no key.
    let current_user = format!("current@{}", keys.display());
    let first = Key::from_hex(&keyring.lookup(&current_user).expect("a key in the keyring"))
        .expect("64 hex digits");
    assert!(keys.join("in-keyring").is_file());
    assert!(!keys.join("current").exists(), "no key file");
    let transcript = std::fs::read_dir(&sessions)
        .expect("sessions")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("a transcript");
    let id = transcript
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("id")
        .to_string();
    assert_eq!(
        sealed_with(&transcript).expect("header").map(|h| h.key),
        Some(first.id())
    );
    let bytes = std::fs::read(&transcript).expect("read");
    assert!(!bytes.windows(14).any(|w| w == b"PROMPT-keyring"));
    let shown = String::from_utf8(agent(&["keys", "show"], bus).stdout).expect("utf8");
    assert!(
        shown.contains("kept in     the OS keyring")
            && shown.contains(&format!("{} from the OS keyring", first.id())),
        "{shown}"
    );
    // Read back through the keyring's key.
    assert!(agent(&["sessions", "training", &id, "allow"], bus)
        .status
        .success());
    let exported = agent(&["export", &id], bus);
    assert!(exported.status.success(), "{exported:?}");
    assert!(String::from_utf8_lossy(&exported.stdout).contains("PROMPT-keyring"));
    // Rotation: a new key in the keyring, the old one retired there, the
    // transcript sealed again and still read.
    let rotated = agent(&["keys", "rotate"], bus);
    let said = String::from_utf8_lossy(&rotated.stdout).to_string();
    assert!(rotated.status.success(), "{rotated:?}");
    assert!(
        said.contains(" file(s) re-encrypted")
            && !said.contains("; 0 file(s) re-encrypted")
            && said.contains("kept in the OS keyring's entry retired@"),
        "{said}"
    );
    let second =
        Key::from_hex(&keyring.lookup(&current_user).expect("the new key")).expect("64 hex digits");
    assert_ne!(second.id(), first.id());
    let retired = keyring
        .lookup(&format!("retired@{}", keys.display()))
        .expect("the retired key");
    assert_eq!(Key::from_hex(&retired).expect("hex").id(), first.id());
    assert!(keyring
        .lookup(&format!("next@{}", keys.display()))
        .is_none());
    assert_eq!(
        sealed_with(&transcript).expect("header").map(|h| h.key),
        Some(second.id())
    );
    assert!(!keys.join("current").exists() && !keys.join("next").exists());
    let exported = agent(&["export", &id], bus);
    assert!(exported.status.success(), "{exported:?}");
    // No keyring on this session: a clear error naming it; nothing made,
    // nothing changed.
    let before = std::fs::read(&transcript).expect("read");
    let lost = agent(&["export", &id], None);
    assert_eq!(
        keyring.lookup(&current_user).as_deref(),
        Some(second.to_hex().as_str()),
        "the keyring's key is untouched"
    );
    assert!(!lost.status.success());
    let said = String::from_utf8_lossy(&lost.stderr).to_string();
    assert!(said.contains("kept in the OS keyring"), "{said}");
    assert!(
        !keys.join("current").exists(),
        "no key file made beside them"
    );
    assert_eq!(std::fs::read(&transcript).expect("read"), before);
    // STACK_RUNTIME_KEY still opens it, for hosts without a keyring.
    let by_variable = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["--policy", policy.to_str().expect("utf8"), "export", &id])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", &config)
        .env("STACK_RUNTIME_KEY", second.to_hex().as_str())
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .expect("agent");
    assert!(by_variable.status.success(), "{by_variable:?}");
    assert!(String::from_utf8_lossy(&by_variable.stdout).contains("PROMPT-keyring"));
    assert!(!keys.join("current").exists());
    // The keyring answers but its entry is gone (a keyring reset): an
    // error that says so, and no new key made beside the old one.
    let cleared = Command::new("secret-tool")
        .args([
            "clear",
            "service",
            "stack-runtime",
            "username",
            &current_user,
        ])
        .env("DBUS_SESSION_BUS_ADDRESS", &keyring.address)
        .status()
        .expect("secret-tool");
    assert!(cleared.success());
    let missing = agent(&["export", &id], bus);
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr).to_string();
    assert!(said.contains("is missing"), "{said}");
    assert!(keyring.lookup(&current_user).is_none(), "no new key");
    assert!(!keys.join("current").exists());
    assert_eq!(std::fs::read(&transcript).expect("read"), before);
    // STACK_RUNTIME_KEYRING=off: a new key goes to a key file, even with
    // the keyring there.
    let other = home.path().join("other-config");
    let off = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["--policy", policy.to_str().expect("utf8"), "sessions"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", &other)
        .env("DBUS_SESSION_BUS_ADDRESS", &keyring.address)
        .env("STACK_RUNTIME_KEYRING", "off")
        .env_remove("STACK_RUNTIME_KEY")
        .output()
        .expect("agent");
    assert!(off.status.success(), "{off:?}");
    let other_keys = other.join("stack-runtime/keys");
    assert!(other_keys.join("current").is_file(), "{off:?}");
    assert!(!other_keys.join("in-keyring").exists());
    assert!(keyring
        .lookup(&format!("current@{}", other_keys.display()))
        .is_none());
}

/// `agent keys show` and `agent keys rotate` on real sealed files under a
/// scratch home: the key file is made 0600, a rotation is refused while a
/// runtime holds the key, re-encrypts every sealed file (and seals the
/// plaintext ones), removes the old key, and `agent export` and `agent
/// sessions` read the files transparently after.
#[test]
fn keys_are_shown_and_rotated_and_sealed_sessions_read_through_the_cli() {
    use stack_runtime::seal::keys::KeyStore;
    use stack_runtime::seal::record::{read_records, sealed_with, Appender, Hold};
    let home = tempfile::tempdir().expect("home");
    let config = home.path().join(".config");
    let sessions = home.path().join("data");
    std::fs::create_dir_all(sessions.join("history")).expect("mkdir");
    let policy = home.path().join("sealed.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"default\"\n[privacy]\nkeep_transcripts = true\ntranscript_dir = \"{}\"\naudit_log = true\nencrypt = true\n",
            sessions.display()
        ),
    )
    .expect("policy");
    let keys = KeyStore::at(config.join("stack-runtime/keys"));
    let vault = keys.vault(true).expect("key");
    let old = vault.sealing_key().expect("key").id();
    let mut transcript = Appender::open(
        &sessions.join("s1.jsonl"),
        "transcript:s1",
        &vault,
        Hold::Nothing,
    )
    .expect("transcript");
    transcript
        .append(br#"{"role":"user","content":"PROMPT-s1"}"#)
        .expect("append");
    drop(transcript);
    // Written before encryption was on: plaintext.
    std::fs::write(sessions.join("history/s1"), "PROMPT-s1\n").expect("history");
    let run = |args: &[&str]| {
        let mut argv = vec!["--policy", policy.to_str().expect("utf8")];
        argv.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(&argv)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", &config)
            .env("STACK_RUNTIME_KEYRING", "off")
            .env_remove("STACK_RUNTIME_KEY")
            .output()
            .expect("agent")
    };
    let shown = String::from_utf8(run(&["keys", "show"]).stdout).expect("utf8");
    assert!(
        shown.contains(&format!("sealed      1 file(s) with key {old}")),
        "{shown}"
    );
    assert!(shown.contains("plaintext   1 file(s)"), "{shown}");
    let doctor = String::from_utf8(run(&["doctor"]).stdout).expect("utf8");
    assert!(
        doctor.contains(&format!(
            "encrypted ({}; {old}",
            stack_runtime::seal::key::RecordCipher::for_this_cpu().describe()
        )),
        "{doctor}"
    );

    // A runtime holds the key: no rotation under it.
    let lease = keys.lease().expect("lease");
    let refused = run(&["keys", "rotate"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("a running agent"),
        "{refused:?}"
    );
    drop(lease);
    let rotated = run(&["keys", "rotate"]);
    let said = String::from_utf8_lossy(&rotated.stdout).to_string();
    assert!(rotated.status.success(), "{rotated:?}");
    assert!(
        said.contains(&format!("rotated: key {old} → "))
            && said.contains("1 file(s) re-encrypted, 1 plaintext file(s) encrypted"),
        "{said}"
    );
    assert!(said.contains("the old key is kept as"), "{said}");
    let after = keys.vault(true).expect("new key");
    let middle = after.sealing_key().expect("key").id();
    assert_ne!(middle, old);
    assert!(after.key(old).is_some(), "retired, it still opens");
    // Again, forgetting the old keys this time.
    let rotated = run(&["keys", "rotate", "--forget-old"]);
    let said = String::from_utf8_lossy(&rotated.stdout).to_string();
    assert!(rotated.status.success(), "{rotated:?}");
    assert!(
        said.contains("2 file(s) re-encrypted") && said.contains("the old key is gone"),
        "{said}"
    );
    let after = keys.vault(true).expect("newest key");
    let new = after.sealing_key().expect("key").id();
    assert!(after.key(old).is_none() && after.key(middle).is_none());
    for file in [sessions.join("s1.jsonl"), sessions.join("history/s1")] {
        assert_eq!(
            sealed_with(&file).expect("header").map(|h| h.key),
            Some(new)
        );
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            !bytes.windows(9).any(|w| w == b"PROMPT-s1"),
            "{}",
            file.display()
        );
    }
    assert!(read_records(&sessions.join("s1.jsonl"), None, &vault).is_err());
    // Read transparently: list, consent, export.
    let listed = String::from_utf8(run(&["sessions"]).stdout).expect("utf8");
    assert!(listed.contains("s1"), "{listed}");
    assert!(run(&["sessions", "training", "s1", "allow"])
        .status
        .success());
    let exported = run(&["export", "s1"]);
    assert!(exported.status.success(), "{exported:?}");
    assert!(String::from_utf8_lossy(&exported.stdout).contains("PROMPT-s1"));
    // Without the key: a clear error, and the file is still there.
    std::fs::remove_file(keys.current_path()).expect("lose the key");
    let lost = run(&["export", "s1"]);
    assert!(!lost.status.success());
    let said = String::from_utf8_lossy(&lost.stderr).to_string();
    assert!(
        said.contains("has no key") || said.contains("not this runtime's"),
        "{said}"
    );
    assert!(sessions.join("s1.jsonl").exists());
}
