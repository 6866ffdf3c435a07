//! Code as a notebook cell: where a Python or JavaScript program ends in a
//! bare expression, its value is printed, as Jupyter, IPython and Node's
//! REPL show it. A model often writes the computation alone (`17 * 23`,
//! `[3, 1, 2].sort()`) and expects to see its value; run as a script, it
//! printed nothing. Code whose last statement yields nothing (a `print`,
//! an assignment in Python, a declaration) prints as before; one that
//! yields a value shows it, as in a notebook (`f.write(text)` its count).
//!
//! * Python (`cell.py`, for both sandboxes and the stateful session): the
//!   code's last statement, when it is an expression statement whose value
//!   is not `None`, is printed with `repr`, unless the code ends in `;`
//!   (IPython's rule). Tracebacks leave the runner's own frames out.
//! * JavaScript (QuickJS-ng): the script's completion value, when it is
//!   not `undefined` or a promise, is printed: strings, arrays and plain
//!   objects as JSON, anything else as `String` gives it. As in Node's
//!   REPL, loops and assignments have one too (`x = 5` shows `5`). Code that may be a module (`import`, `export`
//!   or a top-level `await` anywhere in it) runs as QuickJS runs it alone,
//!   which tells a module from a script; a module has no completion value.
//! * Bash prints what its commands print already.
//!
//! The runners are fixed text passed as the interpreter's program; the
//! model's code travels as an argument (or, in the process sandbox, as the
//! sealed code file) and is never spliced into them.

/// `python -c` text: runs the code given after it as a cell in
/// `__main__`, where `python -c CODE` would run it (`--code CODE`), or the
/// file given after it as `python FILE` would (`--file FILE`), and exits
/// with its status. It imports nothing a workspace file could stand in
/// for: `sys` and `os` are loaded at start, `_ast` is built in.
pub(crate) const PYTHON_MAIN: &str = concat!(
    include_str!("cell.py"),
    r#"def _stack_main():
    import sys
    run = _stack_run_cell
    namespace = sys.modules["__main__"].__dict__
    del namespace["_stack_run_cell"], namespace["_stack_main"]
    how, what = sys.argv[1], sys.argv[2]
    if how == "--file":
        # As `python FILE` runs it: bytes, so `compile` reads its coding
        # line; its folder first on the path, not the working directory.
        import os
        with open(what, "rb") as source:
            code = source.read()
        sys.argv = [what]
        sys.path[0] = os.path.dirname(os.path.abspath(what))
        namespace["__file__"] = what
        filename = what
    else:
        code = what
        sys.argv = ["-c"]
        filename = "<string>"
    sys.exit(run(code, filename, namespace))
_stack_main()
"#
);

/// QuickJS `-e` text: runs the script given as the last argument and
/// prints its completion value. Only for [`javascript_is_script`] code.
pub(crate) const JAVASCRIPT_MAIN: &str = r#"(() => {
  // Taken before the code runs, which may replace any of them.
  const show = console.log, json = JSON.stringify, text = String;
  const isArray = Array.isArray, protoOf = Object.getPrototypeOf, plain = Object.prototype;
  // `scriptArgs` as `qjs -e CODE` leaves it: empty.
  const code = scriptArgs.pop();
  const value = std.evalScript(code, { backtrace_barrier: true });
  if (value === undefined || (value !== null && typeof value.then === "function")) {
    return;
  }
  let shown;
  try {
    if (typeof value === "string" || isArray(value)
        || (typeof value === "object" && value !== null && protoOf(value) === plain)) {
      shown = json(value);
    }
  } catch (_) {}
  show(shown === undefined ? text(value) : shown);
})();"#;

/// Whether `code` is surely a script, not a module: no `import`, `export`
/// or `await` appears in it as a word (a string or comment that holds one
/// counts too, which only means its value is not shown).
pub(crate) fn javascript_is_script(code: &str) -> bool {
    !code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .any(|word| matches!(word, "import" | "export" | "await"))
}

#[cfg(test)]
mod tests {
    use super::javascript_is_script;

    #[test]
    fn code_that_may_be_a_module_is_left_to_quickjs() {
        for script in [
            "[3, 1, 2].sort()",
            "const imported = 1; imported",
            "console.log('$await')",
            "exports_ = 2",
        ] {
            assert!(javascript_is_script(script), "{script}");
        }
        for module in [
            "import * as std from 'qjs:std'; std.printf('x')",
            "export const x = 1",
            "await Promise.resolve(1)",
            "const x = 1;\nimport('os')",
        ] {
            assert!(!javascript_is_script(module), "{module}");
        }
    }
}
