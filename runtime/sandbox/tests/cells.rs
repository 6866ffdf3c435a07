//! Code as a notebook cell, in every way the runtime runs it: a program
//! that ends in a bare expression has its value printed (Python: the
//! `repr` of a last expression statement that is not `None`; JavaScript:
//! a script's completion value), with real `python.wasm` and
//! `quickjs.wasm` in wasmtime (one-shot runs and a stateful session) and
//! real `python3` in the process sandbox. Without it, each "shown" case
//! below printed nothing.

mod common;

use common::{process_sandbox, wasi_sandbox as wasi};
use stack_sandbox::process::ProcessPolicy;
use stack_sandbox::wasi::{PythonSession, WasiPolicy};
use stack_sandbox::ExecStatus;
use stack_types::Language;

/// (code, stdout, status): the same in each way Python runs.
const PYTHON_CELLS: &[(&str, &str, ExecStatus)] = &[
    ("17 * 23", "391\n", ExecStatus::Ok),
    ("'stack'.upper()", "'STACK'\n", ExecStatus::Ok),
    ("xs = [3, 1, 2]\nsorted(xs)", "[1, 2, 3]\n", ExecStatus::Ok),
    ("print('a')\n'b'", "a\n'b'\n", ExecStatus::Ok),
    // Nothing to show: an assignment, None, a call that returns None, and
    // IPython's trailing `;`.
    ("x = 17 * 23", "", ExecStatus::Ok),
    ("None", "", ExecStatus::Ok),
    ("print(6 * 7)", "42\n", ExecStatus::Ok),
    ("17 * 23;", "", ExecStatus::Ok),
    // Exit statuses as `python` gives them.
    ("import sys\nsys.exit(3)", "", ExecStatus::Failed),
    ("import sys\nsys.exit(0)\n1", "", ExecStatus::Ok),
    ("1 / 0", "", ExecStatus::Failed),
    ("print(", "", ExecStatus::Failed),
    // The code's own names for builtins are its own: the runner's
    // display and error report use the builtins.
    ("eval = 3\neval", "3\n", ExecStatus::Ok),
    ("print = None\nrepr = None\n5", "5\n", ExecStatus::Ok),
    ("type = 'csv'\n1 / 0", "", ExecStatus::Failed),
];

/// (code, stdout, status) in QuickJS.
const JAVASCRIPT_CELLS: &[(&str, &str, ExecStatus)] = &[
    ("12 * 12", "144\n", ExecStatus::Ok),
    (
        "'stack'.split('').reverse().join('')",
        "\"kcats\"\n",
        ExecStatus::Ok,
    ),
    ("[3, 1, 2].sort()", "[1,2,3]\n", ExecStatus::Ok),
    ("({ a: 1 })", "{\"a\":1}\n", ExecStatus::Ok),
    ("Symbol('x')", "Symbol(x)\n", ExecStatus::Ok),
    // A promise has nothing to show yet; `console` replaced is the code's.
    ("Promise.resolve(1)", "", ExecStatus::Ok),
    ("console = null; 6 * 7", "42\n", ExecStatus::Ok),
    ("scriptArgs.length", "0\n", ExecStatus::Ok),
    ("let n = 7", "", ExecStatus::Ok),
    ("console.log('abc'.length)", "3\n", ExecStatus::Ok),
    ("throw new Error('boom')", "", ExecStatus::Failed),
    // Code that may be a module runs as QuickJS runs it alone.
    (
        "await Promise.resolve(0); console.log('module')",
        "module\n",
        ExecStatus::Ok,
    ),
];

fn wasi_policy() -> WasiPolicy {
    WasiPolicy {
        wall_ms: 5000,
        memory_bytes: 128 << 20,
        output_bytes: 64 * 1024,
        ..WasiPolicy::default()
    }
}

fn check(how: &str, code: &str, want: (&str, ExecStatus), got: &stack_sandbox::Execution) {
    assert_eq!(
        (got.stdout.as_str(), got.status),
        want,
        "{how}: {code:?}: {got:?}"
    );
    // A traceback starts at the code, never in the runner (whose names
    // begin `_stack`, and which QuickJS runs as `<cmdline>`).
    for runner in ["_stack", "<cmdline>", "scriptArgs"] {
        assert!(!got.stderr.contains(runner), "{how}: {code:?}: {got:?}");
    }
    if got.status == ExecStatus::Failed && !code.contains("exit") {
        assert!(
            got.stderr.contains("Error"),
            "{how}: {code:?} says why: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_shows_a_last_expression_in_every_sandbox() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let sandbox = wasi();
    let mut session = PythonSession::new(sandbox.clone(), workspace.path(), wasi_policy());
    let process = process_sandbox();
    for &(code, stdout, status) in PYTHON_CELLS {
        let want = (stdout, status);
        let one_shot = sandbox
            .run_python(code, workspace.path(), &wasi_policy())
            .await;
        check("wasi", code, want, &one_shot);
        check("session", code, want, &session.run(code).await);
        let outcome = process
            .run_code(
                Language::Python,
                code,
                workspace.path(),
                &ProcessPolicy::default(),
            )
            .await;
        check("process", code, want, &outcome);
    }
    // The errors say where, in the code's own terms: the line, and the
    // code's frame for an error the code raised, even a SyntaxError.
    let failed = sandbox
        .run_python("x = 1\n1 / 0", workspace.path(), &wasi_policy())
        .await;
    assert!(
        failed.stderr.contains("line 2") && failed.stderr.contains("ZeroDivisionError"),
        "{failed:?}"
    );
    let raised = sandbox
        .run_python("x = 1\ny = eval('1 +')", workspace.path(), &wasi_policy())
        .await;
    assert!(
        raised.stderr.contains("line 2, in <module>") && raised.stderr.contains("SyntaxError"),
        "{raised:?}"
    );
    // The state a session keeps is shown as any value is.
    assert_eq!(session.run("total = 40").await.stdout, "");
    assert_eq!(session.run("total + 2").await.stdout, "42\n");
    // Run as `python -c` and `python FILE` would: the same `sys.argv`,
    // `__name__` and, for a file, `__file__`.
    let argv = sandbox
        .run_python(
            "import sys\n(sys.argv, __name__)",
            workspace.path(),
            &wasi_policy(),
        )
        .await;
    assert_eq!(argv.stdout, "(['-c'], '__main__')\n", "{argv:?}");
    let file = process
        .run_code(
            Language::Python,
            "import sys\n(sys.argv == [__file__], __file__.endswith('main.py'), __name__)",
            workspace.path(),
            &ProcessPolicy::default(),
        )
        .await;
    assert_eq!(file.stdout, "(True, True, '__main__')\n", "{file:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_shows_a_scripts_completion_value() {
    let workspace = tempfile::tempdir().expect("tempdir");
    let sandbox = wasi();
    for &(code, stdout, status) in JAVASCRIPT_CELLS {
        let outcome = sandbox
            .run_javascript(code, workspace.path(), &wasi_policy())
            .await;
        check("quickjs", code, (stdout, status), &outcome);
    }
}
