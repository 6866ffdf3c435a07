//! The WASI sandbox with the real `python.wasm` and `quickjs.wasm` in real
//! wasmtime: isolation, deadlines, memory, output caps, stateful sessions,
//! trap isolation, script tools and the compiled-module cache.

mod common;

use std::os::unix::fs::PermissionsExt;

use std::sync::Arc;

use stack_sandbox::wasi::{ModuleSource, PythonSession, WasiEngine, WasiPolicy, WasiSandbox};
use stack_sandbox::ExecStatus;
use stack_types::ScriptRuntime;

/// The process-wide sandbox: compiling python.wasm takes seconds, so every
/// test shares one engine and its compiled interpreters.
use common::wasi_sandbox as sandbox;

fn quick() -> WasiPolicy {
    WasiPolicy {
        wall_ms: 3000,
        memory_bytes: 128 << 20,
        output_bytes: 64 * 1024,
        ..WasiPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_and_javascript_run_against_the_workspace() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("data.txt"), "from the host").expect("write");
    let outcome = sandbox()
        .run_python("print(open('data.txt').read()); written = open('/workspace/out.txt', 'w').write('from the guest')", workspace.path(), &quick())
        .await;
    assert_eq!(
        (outcome.status, outcome.stdout.as_str()),
        (ExecStatus::Ok, "from the host\n"),
        "{outcome:?}"
    );
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("out.txt")).expect("written"),
        "from the guest"
    );
    let js = sandbox()
        .run_javascript("const f = std.open('data.txt', 'r'); const text = f.readAsString(); f.close(); console.log(text.toUpperCase())", workspace.path(), &quick())
        .await;
    assert_eq!(
        (js.status, js.stdout.as_str()),
        (ExecStatus::Ok, "FROM THE HOST\n"),
        "{js:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_outside_the_preopen_can_be_reached() {
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "TOPSECRET").expect("write");
    let workspace = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(&secret, workspace.path().join("link")).expect("symlink");
    let secret = secret.display().to_string();
    let python_attacks = [
        format!("print(open('{secret}').read())"),
        "print(open('/etc/passwd').read())".to_string(),
        "print(open('../' * 20 + 'etc/passwd').read())".to_string(),
        "print(open('link').read())".to_string(),
        "import os; print(os.listdir('/proc'))".to_string(),
        "import socket; s = socket.socket(); s.connect(('127.0.0.1', 22)); print('LEAK')"
            .to_string(),
        "import os; print(sorted(os.environ))".to_string(),
    ];
    for code in &python_attacks {
        let outcome = sandbox().run_python(code, workspace.path(), &quick()).await;
        let all = format!("{}{}", outcome.stdout, outcome.stderr);
        assert!(
            !all.contains("TOPSECRET") && !all.contains("root:") && !all.contains("LEAK"),
            "{code}: {outcome:?}"
        );
        if code.contains("environ") {
            assert_eq!(outcome.status, ExecStatus::Ok);
            assert!(
                !all.contains("PATH")
                    && !all.contains("CARGO")
                    && !all.contains("HOME', 'LC_ALL', 'PATH"),
                "{all}"
            );
        } else {
            assert_eq!(outcome.status, ExecStatus::Failed, "{code}: {outcome:?}");
        }
    }
    let js = sandbox().run_javascript(&format!("const f = std.open('{secret}', 'r'); console.log(f ? 'LEAK ' + f.readAsString() : 'blocked')"), workspace.path(), &quick()).await;
    assert!(!js.stdout.contains("LEAK"), "{js:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_loops_hit_the_deadline() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        wall_ms: 500,
        ..quick()
    };
    let started = std::time::Instant::now();
    let python = sandbox()
        .run_python("while True:\n    pass", workspace.path(), &policy)
        .await;
    assert_eq!(
        (python.status, python.limit.map(stack_types::Limit::as_str)),
        (ExecStatus::Timeout, Some("wall_time")),
        "{python:?}"
    );
    let js = sandbox()
        .run_javascript("for (;;) {}", workspace.path(), &policy)
        .await;
    assert_eq!(js.status, ExecStatus::Timeout, "{js:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Red-team M4: every file a guest opens is a descriptor of the runtime's
/// own process. A guest that opens files in a loop is stopped at the
/// policy's cap, in a fresh interpreter and in a stateful session, so it
/// never holds more than that many of the runtime's descriptors.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_cannot_use_up_the_runtimes_descriptors() {
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("in.txt"), "inside\n").expect("write");
    let policy = WasiPolicy {
        open_files: 200,
        ..quick()
    };
    let hoard = "import os\nfs = []\nwhile len(fs) < 5000:\n    fs.append(os.open('in.txt', os.O_RDONLY))\nprint('held', len(fs))";
    let fresh = sandbox().run_python(hoard, workspace.path(), &policy).await;
    assert_eq!(
        (fresh.status, fresh.limit.map(stack_types::Limit::as_str)),
        (ExecStatus::Killed, Some("open_files")),
        "{fresh:?}"
    );
    assert!(fresh.error.unwrap_or_default().contains("200 files"));
    let mut session = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    let stateful = session.run(hoard).await;
    assert_eq!(
        stateful.limit,
        Some(stack_types::Limit::OpenFiles),
        "{stateful:?}"
    );
    assert!(!stateful.stdout.contains("held"), "{stateful:?}");
    // Health: files can still be opened under the cap, by a fresh guest
    // and by the session that was reset.
    let healthy = "fs = [open('in.txt') for _ in range(150)]\nprint(fs[-1].read().strip())";
    let ok = sandbox()
        .run_python(healthy, workspace.path(), &policy)
        .await;
    assert_eq!(
        (ok.status, ok.stdout.as_str()),
        (ExecStatus::Ok, "inside\n"),
        "{ok:?}"
    );
    assert_eq!(session.run(healthy).await.stdout, "inside\n");
}

/// Red-team M2: a FIFO in the workspace (which code in the process sandbox
/// can make) blocked a WASI guest's `open` inside the host, out of the
/// epoch deadline's reach, for ever. The deadline now holds for Python,
/// JavaScript and a stateful session, and each then works again.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_in_the_workspace_cannot_outlast_the_deadline() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let fifo = workspace.path().join("notes.txt");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
    // Whoever the guest runs as may read and write it (umask aside).
    std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .expect("chmod");
    let policy = WasiPolicy {
        wall_ms: 1000,
        ..quick()
    };
    let started = std::time::Instant::now();
    let python = sandbox()
        .run_python("print(open('notes.txt').read())", workspace.path(), &policy)
        .await;
    assert_eq!(python.status, ExecStatus::Timeout, "{python:?}");
    let writer = sandbox()
        .run_python(
            "open('notes.txt', 'w').write('x')",
            workspace.path(),
            &policy,
        )
        .await;
    assert_eq!(writer.status, ExecStatus::Timeout, "{writer:?}");
    let js = sandbox()
        .run_javascript(
            "let f = std.open('notes.txt', 'r'); print(f.readAsString());",
            workspace.path(),
            &policy,
        )
        .await;
    // QuickJS may open without blocking and read nothing; either way the
    // call ends by its deadline.
    assert!(
        js.status == ExecStatus::Timeout || js.duration_ms < policy.wall_ms,
        "{js:?}"
    );
    let mut session = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    assert_eq!(session.run("x = 1").await.status, ExecStatus::Ok);
    let stuck = session.run("open('notes.txt').read()").await;
    assert_eq!(stuck.status, ExecStatus::Timeout, "{stuck:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "four calls of 1 s each took {:?}",
        started.elapsed()
    );
    // Health: the same sandbox and session run code again.
    assert_eq!(session.run("print('alive')").await.stdout, "alive\n");
    let ok = sandbox()
        .run_python("print(6 * 7)", workspace.path(), &policy)
        .await;
    assert_eq!(ok.stdout, "42\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_bombs_are_stopped_at_the_cap() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let python = sandbox()
        .run_python(
            "a = []\nwhile True:\n    a.append(bytearray(8 << 20))",
            workspace.path(),
            &quick(),
        )
        .await;
    assert_eq!(
        (python.status, python.limit.map(stack_types::Limit::as_str)),
        (ExecStatus::Killed, Some("memory")),
        "{python:?}"
    );
    let js = sandbox()
        .run_javascript(
            "const a = []; for (;;) a.push(new ArrayBuffer(8 << 20));",
            workspace.path(),
            &quick(),
        )
        .await;
    assert_eq!(
        (js.status, js.limit.map(stack_types::Limit::as_str)),
        (ExecStatus::Killed, Some("memory")),
        "{js:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_floods_are_capped_and_the_guest_keeps_running() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        output_bytes: 1 << 20,
        ..quick()
    };
    // Write exactly the cap, then past it; the guest must not see an I/O error.
    let code = "import sys\nsys.stdout.write('x' * (1 << 20)); sys.stdout.flush()\nfor _ in range(64):\n    sys.stdout.write('y' * 65536)\nsys.stdout.flush()\nsys.stderr.write('finished')";
    let outcome = sandbox().run_python(code, workspace.path(), &policy).await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{:?}", outcome.error);
    assert!(outcome.truncated);
    assert_eq!(outcome.stdout.len(), 1 << 20);
    assert!(outcome.stdout.bytes().all(|b| b == b'x'));
    assert_eq!(outcome.stderr, "finished");
    let js = sandbox()
        .run_javascript(
            "for (let i = 0; i < 40000; i++) console.log('z'.repeat(100)); std.err.puts('done')",
            workspace.path(),
            &policy,
        )
        .await;
    assert_eq!(
        (js.status, js.truncated, js.stdout.len(), js.stderr.as_str()),
        (ExecStatus::Ok, true, 1 << 20, "done")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn session_state_persists_and_a_trap_resets_only_that_session() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        wall_ms: 1000,
        ..quick()
    };
    let mut first = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    let mut second = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    assert_eq!(first.run("x = 41").await.status, ExecStatus::Ok);
    assert_eq!(second.run("y = 'other'").await.status, ExecStatus::Ok);
    let answer = first.run("print(x + 1)").await;
    assert_eq!(
        (answer.status, answer.stdout.as_str()),
        (ExecStatus::Ok, "42\n"),
        "{answer:?}"
    );
    // Errors keep the state; input() cannot read the protocol stream.
    let failed = first.run("x += 1\nraise ValueError('boom')").await;
    assert_eq!(failed.status, ExecStatus::Failed);
    assert!(
        failed.stderr.contains("ValueError: boom") && !failed.stderr.contains("_serve"),
        "{failed:?}"
    );
    assert_eq!(first.run("print(x)").await.stdout, "42\n");
    assert_eq!(first.run("input()").await.status, ExecStatus::Failed);
    assert_eq!(first.run("print(x)").await.stdout, "42\n");
    // A deadline trap resets the first session and says so.
    let trapped = first.run("while True:\n    pass").await;
    assert_eq!(trapped.status, ExecStatus::Timeout);
    assert!(trapped
        .error
        .unwrap_or_default()
        .contains("session was reset"));
    assert_eq!(first.resets(), 1);
    let gone = first.run("print(x)").await;
    assert!(gone.stderr.contains("NameError"), "{gone:?}");
    // The other session never noticed.
    let other = second.run("print(y)").await;
    assert_eq!(
        (other.status, other.stdout.as_str()),
        (ExecStatus::Ok, "other\n")
    );
    // A memory trap also resets.
    let bomb = second
        .run("a = []\nwhile True:\n    a.append(bytearray(8 << 20))")
        .await;
    assert!(
        matches!(bomb.status, ExecStatus::Killed | ExecStatus::Failed),
        "{bomb:?}"
    );
    assert_eq!(second.run("print('alive')").await.stdout, "alive\n");
}

/// Red-team M6: the guest can read the driver's nonce and print a forged
/// end-of-frame marker. The frame must not end there: the exception raised
/// afterwards is reported, and code that keeps running after its forged
/// marker is stopped by the deadline, not left running with none.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_end_of_frame_marker_ends_nothing() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        wall_ms: 1500,
        ..quick()
    };
    let mut session = PythonSession::new(sandbox(), workspace.path(), policy);
    let forge = |then: &str| {
        format!(
            "import sys\nframe = sys._getframe(1)\nwhile 'nonce' not in frame.f_locals:\n    frame = frame.f_back\nnonce = frame.f_locals['nonce']\nprint('before', flush=True)\nsys.stdout.write('\\0' + nonce + ':0\\0'); sys.stdout.flush()\n{then}"
        )
    };
    // The attack: a forged "ok", then work and a failure.
    let raised = session
        .run(&forge(
            "open('after-marker.txt', 'w').write('ran')\nraise RuntimeError('reported after all')",
        ))
        .await;
    assert_eq!(raised.status, ExecStatus::Failed, "{raised:?}");
    assert!(
        raised.stderr.contains("RuntimeError: reported after all"),
        "{raised:?}"
    );
    assert!(workspace.path().join("after-marker.txt").exists());
    // A forged marker followed by a loop: the deadline still holds.
    let looped = session.run(&forge("while True:\n    pass")).await;
    assert_eq!(looped.status, ExecStatus::Timeout, "{looped:?}");
    // Polling stdin (which finds it empty) is not waiting for a frame.
    for poll in ["0", "5"] {
        let polled = session
            .run(&forge(&format!(
                "import select\nselect.select([0], [], [], {poll})\nwhile True:\n    pass"
            )))
            .await;
        assert_eq!(
            polled.status,
            ExecStatus::Timeout,
            "select timeout {poll}: {polled:?}"
        );
    }
    // Health: the session starts afresh and works.
    let healthy = session.run("print(6 * 7)").await;
    assert_eq!(
        (healthy.status, healthy.stdout.as_str()),
        (ExecStatus::Ok, "42\n"),
        "{healthy:?}"
    );
    // Code that reads the session's own input ends its frame with a clear
    // error, and the session is reset rather than left in the cell's hands.
    let stolen = session
        .run("import sys\nsys.__stdin__.buffer.readline()")
        .await;
    assert_eq!(stolen.status, ExecStatus::Failed, "{stolen:?}");
    assert!(
        stolen.error.unwrap_or_default().contains("own input"),
        "the error names the cause"
    );
    assert_eq!(session.run("print('alive')").await.stdout, "alive\n");
}

/// A session runs each call under the policy in force for that call: a
/// shorter wall-clock limit applies at once (state kept); a different
/// memory cap needs a new interpreter, and the outcome says so.
#[tokio::test(flavor = "multi_thread")]
async fn session_calls_run_under_their_own_policy() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let roomy = WasiPolicy {
        wall_ms: 20_000,
        ..quick()
    };
    let mut session = PythonSession::new(sandbox(), workspace.path(), roomy.clone());
    assert_eq!(session.run("x = 41").await.status, ExecStatus::Ok);
    let tight = WasiPolicy {
        wall_ms: 300,
        ..roomy.clone()
    };
    session.set_policy(&tight);
    let slow = session.run("while True:\n    pass").await;
    assert_eq!(
        slow.status,
        ExecStatus::Timeout,
        "the call's own limit: {slow:?}"
    );
    assert!(slow.duration_ms < 4000, "{slow:?}");
    session.set_policy(&roomy);
    assert_eq!(session.run("x = 41").await.status, ExecStatus::Ok);
    session.set_policy(&roomy);
    assert_eq!(
        session.run("print(x + 1)").await.stdout,
        "42\n",
        "same policy keeps state"
    );
    let smaller = WasiPolicy {
        memory_bytes: roomy.memory_bytes / 2,
        ..roomy.clone()
    };
    session.set_policy(&smaller);
    let after = session.run("print(x + 1)").await;
    assert!(after.stderr.contains("NameError"), "{after:?}");
    assert!(
        after
            .error
            .unwrap_or_default()
            .contains("sandbox policy for this call differs"),
        "says why the state is gone"
    );
    let bomb = session
        .run("a = []\nwhile True:\n    a.append(bytearray(8 << 20))")
        .await;
    assert!(
        matches!(bomb.status, ExecStatus::Killed | ExecStatus::Failed),
        "{bomb:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn script_tools_get_their_arguments_on_stdin() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let tools = common::repo_root().join("tools/scripts");
    let csv = sandbox()
        .run_script(
            ScriptRuntime::Python,
            &tools.join("csv_json.py"),
            br#"{"data": "a,b\n1,2\n", "direction": "csv_to_json"}"#.to_vec(),
            workspace.path(),
            &quick(),
        )
        .await;
    assert_eq!(
        (csv.status, csv.stdout.as_str()),
        (ExecStatus::Ok, "[{\"a\": \"1\", \"b\": \"2\"}]\n"),
        "{csv:?}"
    );
    let back = sandbox()
        .run_script(
            ScriptRuntime::Python,
            &tools.join("csv_json.py"),
            br#"{"data": "[{\"a\": 1}, {\"b\": 2}]", "direction": "json_to_csv"}"#.to_vec(),
            workspace.path(),
            &quick(),
        )
        .await;
    assert_eq!(back.stdout, "a,b\n1,\n,2\n");
    let units = sandbox()
        .run_script(
            ScriptRuntime::Javascript,
            &tools.join("unit_convert.js"),
            br#"{"value": 1, "from": "mi", "to": "km"}"#.to_vec(),
            workspace.path(),
            &quick(),
        )
        .await;
    assert_eq!(
        (units.status, units.stdout.as_str()),
        (ExecStatus::Ok, "{\"value\":1.609344,\"unit\":\"km\"}\n"),
        "{units:?}"
    );
}

#[test]
fn the_module_cache_refuses_files_it_did_not_write() {
    let cache = tempfile::tempdir().expect("tempdir");
    let quickjs = stack_assets::Asset::QuickjsWasm
        .locate()
        .expect("quickjs.wasm");
    let load = || {
        let engine = WasiEngine::new(cache.path().join("wasm"), false).expect("engine");
        engine
            .load(&quickjs)
            .map(|(_, source)| source)
            .expect("load")
    };
    assert_eq!(load(), ModuleSource::Compiled, "first load compiles");
    assert_eq!(load(), ModuleSource::Cache, "second load uses the cache");
    let dir = cache.path().join("wasm");
    let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let cwasm = std::fs::read_dir(&dir)
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cache file");
    // Replaced by someone else (a different file at the same path): refused.
    let bytes = std::fs::read(&cwasm).expect("read");
    std::fs::remove_file(&cwasm).expect("remove");
    std::fs::write(&cwasm, &bytes).expect("write");
    assert_eq!(
        load(),
        ModuleSource::Compiled,
        "a file the runtime did not write is recompiled"
    );
    // Made writable by others: refused.
    std::fs::set_permissions(&cwasm, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    assert_eq!(load(), ModuleSource::Compiled);
    assert_eq!(load(), ModuleSource::Cache);
}

#[tokio::test(flavor = "multi_thread")]
async fn fuel_gives_a_deterministic_instruction_budget() {
    let cache = tempfile::tempdir().expect("tempdir");
    let engine = WasiEngine::new(cache.path().to_path_buf(), true).expect("engine");
    let sandbox = WasiSandbox::new(Arc::clone(&engine));
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        fuel: Some(50_000_000),
        wall_ms: 20_000,
        ..quick()
    };
    let outcome = sandbox
        .run_javascript("for (;;) {}", workspace.path(), &policy)
        .await;
    assert_eq!(
        (
            outcome.status,
            outcome.limit.map(stack_types::Limit::as_str)
        ),
        (ExecStatus::Killed, Some("fuel")),
        "{outcome:?}"
    );
    let fine = sandbox
        .run_javascript("console.log(1 + 1)", workspace.path(), &policy)
        .await;
    assert_eq!(fine.stdout, "2\n");
}

/// A guest asleep in a host call runs no code for the epoch to interrupt:
/// its sleep still ends at the call's deadline, as a wall-time limit, and a
/// short sleep still sleeps.
#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_guest_is_stopped_at_the_deadline() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let policy = WasiPolicy {
        wall_ms: 500,
        ..quick()
    };
    for code in [
        "import time\ntime.sleep(30)\nprint('woke')",
        "import time\nwhile True:\n    time.sleep(0.05)",
        "import select\nselect.select([], [], [], 30)\nprint('woke')",
    ] {
        let slept = sandbox().run_python(code, workspace.path(), &policy).await;
        assert_eq!(slept.status, ExecStatus::Timeout, "{code}: {slept:?}");
        assert_eq!(
            slept.limit.map(stack_types::Limit::as_str),
            Some("wall_time"),
            "{slept:?}"
        );
        assert!(
            slept.duration_ms < 3000,
            "{code}: slept past the deadline: {slept:?}"
        );
    }
    let short = sandbox()
        .run_python(
            "import time\nt = time.monotonic()\ntime.sleep(0.2)\nprint(time.monotonic() - t >= 0.19)",
            workspace.path(),
            &WasiPolicy {
                wall_ms: 3000,
                ..quick()
            },
        )
        .await;
    assert_eq!(
        (short.status, short.stdout.as_str()),
        (ExecStatus::Ok, "True\n"),
        "{short:?}"
    );
    // The same in a stateful session, which then starts afresh.
    let mut session = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    assert_eq!(session.run("x = 1").await.status, ExecStatus::Ok);
    let slept = session.run("import time\ntime.sleep(30)").await;
    assert_eq!(slept.status, ExecStatus::Timeout, "{slept:?}");
    assert!(slept.duration_ms < 3000, "{slept:?}");
    assert_eq!(session.run("print('alive')").await.stdout, "alive\n");
}

/// Red-team finding L3: a root runtime's WASI guest acts as the process
/// sandbox's code would, never as root. In a user's workspace it cannot
/// read a root-only file, and what it creates belongs to that user; the
/// process sandbox sees the same. (Root-only: run as root, as CI does; the
/// unprivileged run skips `as_root_` tests rather than pass them vacuously.)
#[tokio::test(flavor = "multi_thread")]
async fn as_root_a_guest_acts_as_the_workspace_owner_not_root() {
    use std::os::unix::fs::MetadataExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "an `as_root_` test: run it as root, or skip it with `--skip as_root_`"
    );
    let (uid, gid) = common::attacker();
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    nix::unistd::chown(ws, Some(uid.into()), Some(gid.into())).expect("chown");
    std::fs::write(ws.join("rootonly.txt"), "ROOT-0600-IN-USER-WS").expect("write");
    std::fs::set_permissions(
        ws.join("rootonly.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::write(ws.join("shared.txt"), "readable").expect("write");
    let code = "try:\n    print('LEAK', open('rootonly.txt').read())\nexcept Exception as e:\n    print('blocked', type(e).__name__)\nprint(open('shared.txt').read())\nimport os\nos.mkdir('made_by_wasi')\nopen('made_by_wasi/f.txt', 'w').write('x')";
    let outcome = sandbox().run_python(code, ws, &quick()).await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert!(!outcome.stdout.contains("LEAK"), "{outcome:?}");
    assert!(outcome.stdout.starts_with("blocked"), "{outcome:?}");
    assert!(outcome.stdout.contains("readable"), "{outcome:?}");
    for made in ["made_by_wasi", "made_by_wasi/f.txt"] {
        let meta = std::fs::metadata(ws.join(made)).expect("made");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{made}");
    }
    // The runtime's own threads are root again afterwards: a root-only file
    // elsewhere is still readable by the runtime itself.
    assert_eq!(
        std::fs::read_to_string(ws.join("rootonly.txt")).expect("root reads"),
        "ROOT-0600-IN-USER-WS"
    );
    // A stateful session's guest thread acts the same way.
    let mut session = PythonSession::new(sandbox(), ws, quick());
    let again = session
        .run("try:\n    print('LEAK', open('rootonly.txt').read())\nexcept Exception as e:\n    print('blocked', type(e).__name__)")
        .await;
    assert!(again.stdout.starts_with("blocked"), "{again:?}");
    // Health: an ordinary call still works.
    let healthy = sandbox().run_python("print(6 * 7)", ws, &quick()).await;
    assert_eq!(healthy.stdout, "42\n", "{healthy:?}");
}

/// Red-team finding M1 in the WASI sandbox: in a root-owned workspace a
/// root runtime's guest acts as the dedicated sandbox uid and sees the
/// workspace through an idmapped mount: it writes there (what it makes is
/// root's on disk), no ACL is left on anything, and a hard link to a
/// root-only file outside is neither read nor appended to.
#[tokio::test(flavor = "multi_thread")]
async fn as_root_a_root_owned_workspace_is_shared_with_the_guest_through_a_mount() {
    use std::os::unix::fs::MetadataExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "an `as_root_` test: run it as root, or skip it with `--skip as_root_`"
    );
    let outside = tempfile::tempdir().expect("tempdir");
    let private = outside.path().join("root-only");
    std::fs::write(&private, "ROOT-ONLY-OUTSIDE").expect("write");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::fs::write(ws.join("notes.txt"), "mine\n").expect("write");
    std::fs::set_permissions(ws.join("notes.txt"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    std::fs::hard_link(&private, ws.join("linked")).expect("link");
    let code = "print(open('notes.txt').read().strip())\nopen('notes.txt', 'a').write('more\\n')\nimport os\nos.mkdir('made')\nopen('made/f.txt', 'w').write('x')\nfor how in ['r', 'a']:\n    try:\n        f = open('linked', how)\n        print('LEAK', how, f.read() if how == 'r' else f.write('x'))\n    except Exception as e:\n        print('blocked', how, type(e).__name__)";
    let outcome = sandbox().run_python(code, ws, &quick()).await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert!(!outcome.stdout.contains("LEAK"), "{outcome:?}");
    assert_eq!(
        outcome.stdout, "mine\nblocked r PermissionError\nblocked a PermissionError\n",
        "{outcome:?}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("notes.txt")).expect("read"),
        "mine\nmore\n"
    );
    assert_eq!(
        std::fs::read_to_string(&private).expect("read"),
        "ROOT-ONLY-OUTSIDE"
    );
    for made in ["made", "made/f.txt"] {
        let meta = std::fs::metadata(ws.join(made)).expect("made");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{made}");
    }
    for path in [
        ws.to_path_buf(),
        ws.join("notes.txt"),
        ws.join("made"),
        private.clone(),
    ] {
        let held = common::acls_held(&path);
        assert!(held.is_empty(), "{} holds ACLs: {held:?}", path.display());
    }
    // A stateful session's guest thread sees the same.
    let mut session = PythonSession::new(sandbox(), ws, quick());
    let again = session.run("print(open('made/f.txt').read())").await;
    assert_eq!(again.stdout, "x\n", "{again:?}");
}

/// Red-team finding H3 in the WASI sandbox: a root runtime's guest cannot
/// plant git hooks or config, nor read hidden secrets, in a workspace whose
/// protected paths exist (its thread has a mount namespace of its own).
#[tokio::test(flavor = "multi_thread")]
async fn as_root_protected_workspace_paths_hold_in_wasi_too() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "an `as_root_` test: run it as root, or skip it with `--skip as_root_`"
    );
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::fs::create_dir_all(ws.join(".git/hooks")).expect("mkdir");
    std::fs::write(ws.join(".git/config"), "[core]\n").expect("write");
    std::fs::write(ws.join(".env"), "TOKEN=LEAK-in-env\n").expect("write");
    let code = "for what, f in [('config', lambda: open('.git/config', 'a').write('[core]\\n\\tfsmonitor = id\\n')), ('hook', lambda: open('.git/hooks/pre-commit', 'w').write('#!/bin/sh\\nid\\n')), ('env', lambda: open('.env', 'a').write('x'))]:\n    try:\n        f(); print('LEAK', what)\n    except Exception as e:\n        print('blocked', what, type(e).__name__)\nprint(open('.git/config').read().strip())\ntry:\n    print('env holds', repr(open('.env').read()))\nexcept Exception as e:\n    print('env hidden', type(e).__name__)";
    let outcome = sandbox().run_python(code, ws, &quick()).await;
    assert!(!outcome.stdout.contains("LEAK"), "{outcome:?}");
    assert!(outcome.stdout.contains("blocked hook"), "{outcome:?}");
    assert!(
        outcome.stdout.contains("\n[core]\n"),
        "read-only stays readable: {outcome:?}"
    );
    assert!(
        !outcome.stdout.contains("TOKEN"),
        "the hidden .env was read: {outcome:?}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join(".git/config")).expect("read"),
        "[core]\n"
    );
    assert!(!ws.join(".git/hooks/pre-commit").exists());
    // The runtime's own threads still see everything as before.
    assert_eq!(
        std::fs::read_to_string(ws.join(".env")).expect("read"),
        "TOKEN=LEAK-in-env\n"
    );
    let healthy = sandbox()
        .run_python(
            "open('notes.txt', 'w').write('ok'); print(open('notes.txt').read())",
            ws,
            &quick(),
        )
        .await;
    assert_eq!(healthy.stdout, "ok\n", "{healthy:?}");
}

/// A protected path that a guest creates (`.envrc`, which direnv would run)
/// is gone when the call returns, and the call fails saying so: for a
/// fresh interpreter and for a stateful session alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_protected_path_a_guest_creates_is_removed() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    let outcome = sandbox()
        .run_python(
            "open('.envrc', 'w').write('id > /tmp/pwned\\n'); print('made')",
            ws,
            &quick(),
        )
        .await;
    assert_eq!(outcome.status, ExecStatus::Failed, "{outcome:?}");
    assert!(
        outcome.error.clone().unwrap_or_default().contains(".envrc"),
        "{outcome:?}"
    );
    assert!(!ws.join(".envrc").exists(), ".envrc outlived the call");
    let mut session = PythonSession::new(sandbox(), ws, quick());
    let made = session
        .run("import os\nos.makedirs('.vscode', exist_ok=True)\nopen('.vscode/tasks.json', 'w').write('{}')")
        .await;
    assert_eq!(made.status, ExecStatus::Failed, "{made:?}");
    assert!(!ws.join(".vscode").exists(), ".vscode outlived the call");
    let healthy = session.run("print(6 * 7)").await;
    assert_eq!(healthy.stdout, "42\n", "{healthy:?}");
}

/// H3 for every runtime, root or not: Python, JavaScript and a stateful
/// session may read `.git` but not change it, and cannot see `.env`. A root
/// runtime binds them in a mount namespace of the guest's thread; any
/// other runs the guest in the WASI helper (`scripts/test-as-user` runs
/// this test as an ordinary user). Then a `.git` that appears while a
/// session lives restarts the session, which keeps it protected too.
#[tokio::test(flavor = "multi_thread")]
async fn protected_paths_hold_for_python_javascript_and_sessions_as_any_user() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path();
    std::fs::create_dir_all(ws.join(".git/hooks")).expect("mkdir");
    std::fs::write(ws.join(".git/config"), "[core]\n").expect("write");
    std::fs::write(ws.join(".env"), "TOKEN=LEAK-in-env\n").expect("write");
    let python = "for what, f in [('config', lambda: open('.git/config', 'a').write('[core]\\n\\tfsmonitor = id\\n')), ('hook', lambda: open('.git/hooks/pre-commit', 'w').write('#!/bin/sh\\nid\\n')), ('env', lambda: open('.env', 'a').write('x'))]:\n    try:\n        f(); print('LEAK', what)\n    except Exception as e:\n        print('blocked', what, type(e).__name__)\nprint(open('.git/config').read().strip())\ntry:\n    print('env holds', repr(open('.env').read()))\nexcept Exception as e:\n    print('env hidden', type(e).__name__)";
    let outcome = sandbox().run_python(python, ws, &quick()).await;
    assert!(outcome.stdout.contains("blocked config"), "{outcome:?}");
    assert!(outcome.stdout.contains("blocked hook"), "{outcome:?}");
    assert!(outcome.stdout.contains("[core]"), "{outcome:?}");
    assert!(!outcome.stdout.contains("LEAK"), "{outcome:?}");
    assert!(!outcome.stdout.contains("TOKEN"), "{outcome:?}");
    let javascript = "for (const [what, name, mode] of [['config', '.git/config', 'a'], ['hook', '.git/hooks/post-checkout', 'w'], ['env', '.env', 'r']]) { const f = std.open(name, mode); if (f) { if (mode === 'r') console.log('LEAK', what, f.readAsString()); else { f.puts('id\\n'); f.close(); console.log('LEAK', what); } } else console.log('blocked', what); }";
    let js = sandbox().run_javascript(javascript, ws, &quick()).await;
    for what in ["config", "hook", "env"] {
        assert!(js.stdout.contains(&format!("blocked {what}")), "{js:?}");
    }
    let mut session = PythonSession::new(sandbox(), ws, quick());
    let first = session.run("x = 41\nprint('started')").await;
    assert_eq!(first.stdout, "started\n", "{first:?}");
    let stateful = session.run(python).await;
    assert!(stateful.stdout.contains("blocked config"), "{stateful:?}");
    assert!(!stateful.stdout.contains("LEAK"), "{stateful:?}");
    assert!(!stateful.stdout.contains("TOKEN"), "{stateful:?}");
    let kept = session.run("print(x + 1)").await;
    assert_eq!(kept.stdout, "42\n", "state is kept: {kept:?}");
    assert_eq!(
        std::fs::read_to_string(ws.join(".git/config")).expect("read"),
        "[core]\n"
    );
    assert!(!ws.join(".git/hooks/pre-commit").exists());
    assert!(!ws.join(".git/hooks/post-checkout").exists());
    assert_eq!(
        std::fs::read_to_string(ws.join(".env")).expect("read"),
        "TOKEN=LEAK-in-env\n"
    );
    // The user makes `.hg` while the session lives: the next call restarts
    // the interpreter (saying so) rather than leave `.hg` writable to it.
    std::fs::create_dir(ws.join(".hg")).expect("mkdir");
    std::fs::write(ws.join(".hg/hgrc"), "[ui]\n").expect("write");
    let after = session
        .run("try:\n    open('.hg/hgrc', 'a').write('[hooks]\\nupdate = id\\n'); print('LEAK')\nexcept Exception as e:\n    print('blocked', type(e).__name__)")
        .await;
    assert!(after.stdout.starts_with("blocked"), "{after:?}");
    assert!(
        after
            .error
            .clone()
            .unwrap_or_default()
            .contains("restarted"),
        "{after:?}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join(".hg/hgrc")).expect("read"),
        "[ui]\n"
    );
    // The user replaces `.env` the way `sed -i` and editors do (a new file
    // renamed over it): the path list is the same, its inode is not, and
    // the session restarts rather than read through a stale bind.
    std::fs::write(ws.join(".env.new"), "TOKEN=LEAK-replaced\n").expect("write");
    std::fs::rename(ws.join(".env.new"), ws.join(".env")).expect("rename");
    let replaced = session
        .run("try:\n    print('env holds', repr(open('.env').read()))\nexcept Exception as e:\n    print('env hidden', type(e).__name__)")
        .await;
    assert!(!replaced.stdout.contains("LEAK"), "{replaced:?}");
    assert!(
        replaced
            .error
            .clone()
            .unwrap_or_default()
            .contains("restarted"),
        "{replaced:?}"
    );
    // Health: ordinary work in the same workspace, in both interpreters.
    let healthy = session
        .run("open('notes.txt', 'w').write('ok'); print(open('notes.txt').read())")
        .await;
    assert_eq!(healthy.stdout, "ok\n", "{healthy:?}");
    let js_healthy = sandbox()
        .run_javascript(
            "const f = std.open('notes.txt', 'r'); console.log(f.readAsString())",
            ws,
            &quick(),
        )
        .await;
    assert_eq!(js_healthy.stdout, "ok\n", "{js_healthy:?}");
}

/// A workspace that is one of the runtime's own folders, or inside one,
/// is refused before the guest runs: the folder could not be kept
/// read-only inside it. The workspace that holds it runs the same guest.
#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_inside_the_runtimes_own_folder_is_refused() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path().canonicalize().expect("canonical");
    let state = common::RuntimeState::in_workspace(&ws);
    let mut policy = quick();
    policy.protected.extend(state.protected.iter().cloned());
    for inside in state.workspaces_inside() {
        let outcome = sandbox()
            .run_python(common::PLANT_MODULE, &inside, &policy)
            .await;
        common::assert_refused_inside(&outcome, &inside);
    }
    let outcome = sandbox()
        .run_python(common::PLANT_MODULE, &ws, &policy)
        .await;
    assert_eq!(outcome.status, ExecStatus::Ok, "{outcome:?}");
    assert!(ws.join("evil.cwasm").exists());
}

/// Red-team review of the WASI helper: a workspace that is the user's home
/// folder holds the runtime's own folders (see `runtime_state_folders`),
/// which protected lists carry as absolute paths. A guest must not plant
/// native code in the compiled-module cache, nor read or forge the
/// sessions and audit log. As root the files are shared with the sandbox
/// uid, and as a user they are the guest's own: without the protection
/// every write and read below would succeed.
#[tokio::test(flavor = "multi_thread")]
async fn the_runtimes_own_folders_inside_a_workspace_are_protected() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let ws = workspace.path().canonicalize().expect("canonical");
    let state = common::RuntimeState::in_workspace(&ws);
    let mut policy = quick();
    policy.protected.extend(state.protected.iter().cloned());
    let python = "for f in ['.cache/stack-runtime/wasm/module.cwasm', '.cache/stack-runtime/wasm/evil.cwasm', '.local/share/stack-runtime/sessions/s1.jsonl']:\n    try:\n        open(f, 'a').write('NATIVE'); print('LEAK write', f)\n    except Exception as e:\n        print('blocked', type(e).__name__)\ntry:\n    print('LEAK read', open('.local/share/stack-runtime/sessions/s1.jsonl').read())\nexcept Exception as e:\n    print('hidden', type(e).__name__)\ntry:\n    print('LEAK key', open('.config/stack-runtime/keys/current').read())\nexcept Exception as e:\n    print('hidden', type(e).__name__)\nprint('done')";
    let outcome = sandbox().run_python(python, &ws, &policy).await;
    assert!(outcome.stdout.ends_with("done\n"), "{outcome:?}");
    assert!(!outcome.stdout.contains("LEAK"), "{outcome:?}");
    let javascript = "for (const f of ['.cache/stack-runtime/wasm/module.cwasm', '.local/share/stack-runtime/sessions/s1.jsonl']) { const h = std.open(f, 'a'); console.log(h ? 'LEAK ' + f : 'blocked'); } const r = std.open('.local/share/stack-runtime/sessions/s1.jsonl', 'r'); console.log(r ? 'LEAK read ' + r.readAsString() : 'hidden');";
    let js = sandbox().run_javascript(javascript, &ws, &policy).await;
    assert!(js.stdout.contains("hidden"), "{js:?}");
    assert!(!js.stdout.contains("LEAK"), "{js:?}");
    state.assert_untouched();
    // Health: the rest of the workspace is the guest's to write.
    let healthy = sandbox()
        .run_python(
            "open('notes.txt', 'w').write('ok'); print(open('notes.txt').read())",
            &ws,
            &policy,
        )
        .await;
    assert_eq!(healthy.stdout, "ok\n", "{healthy:?}");
}

/// Red team: a WASI guest wrote 11 GB into the workspace in 30 s. Each way
/// of adding (one big file, a file grown by truncate, many files, folders,
/// hard links, symlinks) now stops at the call's disk budget, in a fresh
/// interpreter and in a stateful session (whose budget is per call), and
/// the workspace grows by no more than the budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_cannot_add_more_than_its_disk_budget() {
    const BYTES: u64 = 4 << 20;
    const FILES: u64 = 200;
    let policy = WasiPolicy {
        disk: Some(stack_sandbox::process::DiskBudget {
            bytes: BYTES,
            files: FILES,
        }),
        wall_ms: 20_000,
        ..quick()
    };
    let attacks = [
        ("one big file", "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))"),
        ("a sparse file", "f = open('sparse', 'wb')\nf.truncate(1 << 40)"),
        ("a write far past the end", "f = open('far', 'wb')\nf.seek(1 << 40)\nf.write(b'x')"),
        ("many files", "for i in range(5000):\n    open(f'f{i}', 'w').close()"),
        ("many folders", "import os\nfor i in range(5000):\n    os.mkdir(f'd{i}')"),
        ("many hard links", "import os\nopen('one', 'w').close()\nfor i in range(5000):\n    os.link('one', f'l{i}')"),
        ("many symlinks", "import os\nfor i in range(5000):\n    os.symlink('x', f's{i}')"),
        ("pwrite in append mode", "import os\nfd = os.open('a', os.O_WRONLY | os.O_CREAT | os.O_APPEND)\nwhile True:\n    os.pwrite(fd, b'x' * (1 << 20), 0)"),
        ("filling a sparse file's holes", "f = open('holes', 'r+b')\nfor i in range(1024):\n    f.seek(i << 20)\n    f.write(b'x' * (1 << 20))\n    f.flush()"),
        ("names made through a dangling symlink", "import os\nos.symlink('t', 'l')\nfor i in range(5000):\n    open('l', 'w').close()\n    os.rename('t', f't{i}')"),
    ];
    let size = |dir: &std::path::Path| -> (u64, usize) {
        use std::os::unix::fs::MetadataExt;
        let mut bytes = 0;
        let mut names = 0;
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let meta = std::fs::symlink_metadata(entry.expect("entry").path()).expect("lstat");
            bytes += meta.blocks() * 512;
            names += 1;
        }
        (bytes, names)
    };
    for (what, code) in attacks {
        let workspace = tempfile::tempdir().expect("tempdir");
        // A sparse file of 1 GiB that takes no disk (one a process call
        // could leave behind for free).
        std::fs::File::create(workspace.path().join("holes"))
            .and_then(|f| f.set_len(1 << 30))
            .expect("sparse file");
        let fresh = sandbox().run_python(code, workspace.path(), &policy).await;
        assert_eq!(
            (fresh.status, fresh.limit),
            (ExecStatus::Killed, Some(stack_types::Limit::Disk)),
            "{what}: {fresh:?}"
        );
        let (bytes, names) = size(workspace.path());
        assert!(
            bytes <= BYTES + 4096 * names as u64 && names as u64 <= FILES + 1,
            "{what}: the workspace holds {bytes} bytes in {names} names"
        );
        let disk = fresh.disk.expect("use reported");
        assert!(
            disk.bytes <= BYTES && disk.files <= FILES,
            "{what}: {disk:?}"
        );
    }
    // In a session, the budget is each call's: a second call may add as
    // much again, and a call past it is stopped without losing the session.
    let workspace = tempfile::tempdir().expect("tempdir");
    let mut session = PythonSession::new(sandbox(), workspace.path(), policy.clone());
    for round in 0..2 {
        let ok = session
            .run(&format!(
                "open('part{round}', 'wb').write(b'x' * (3 << 20))\nkept = {round}"
            ))
            .await;
        assert_eq!(ok.status, ExecStatus::Ok, "round {round}: {ok:?}");
    }
    let over = session
        .run("try:\n    open('over', 'wb').write(b'x' * (5 << 20))\nexcept OSError as e:\n    print('refused', e.errno)")
        .await;
    assert_eq!(over.limit, Some(stack_types::Limit::Disk), "{over:?}");
    assert!(
        over.stdout.contains("refused 28") || over.stdout.contains("refused 51"),
        "{over:?}"
    );
    let after = session.run("print(kept)").await;
    assert_eq!(
        (after.status, after.stdout.as_str()),
        (ExecStatus::Ok, "1\n"),
        "{after:?}"
    );
}
