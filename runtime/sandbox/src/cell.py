# Runs Python code as a notebook cell: the code's statements in order and,
# where the last one is a bare expression (`17 * 23`, `sorted(xs)`), its
# value printed as `repr` shows it, unless it is None or the code ends in
# `;` (IPython's rule). Code that prints what it finds behaves as under
# `python -c`. Shared by every way the runtime runs Python: the WASI
# sandbox's one-shot runs and its stateful driver, and the process
# sandbox. `source` is text, or a file's bytes (its coding line
# honoured). Returns the exit status: 0, 1 after a traceback (the
# runner's own frames left out), or what SystemExit says.
def _stack_run_cell(source, filename, namespace):
    # Bound before the code runs: in `__main__` (the one-shot runs) the
    # code may rebind `print`, `eval` or `type` for itself. `_ast` and
    # `builtins` are built in: no module file a workspace could shadow.
    import _ast, builtins as b, sys
    try:
        tree = b.compile(source, filename, "exec", _ast.PyCF_ONLY_AST)
        shown = None
        ends_quiet = source.rstrip()[-1:] in (";", b";")
        if tree.body and b.isinstance(tree.body[-1], _ast.Expr) and not ends_quiet:
            shown = _ast.Expression(tree.body.pop().value)
        b.exec(b.compile(tree, filename, "exec"), namespace)
        if shown is not None:
            value = b.eval(b.compile(shown, filename, "eval"), namespace)
            if value is not None:
                b.print(b.repr(value))
        return 0
    except b.SystemExit as stop:
        if stop.code is None:
            return 0
        if b.isinstance(stop.code, b.int):
            return stop.code
        b.print(stop.code, file=sys.stderr)
        return 1
    except b.BaseException as error:
        # The runner's own frame left out: a parse error has no other,
        # and a run's traceback starts at the code.
        import traceback
        traceback.print_exception(b.type(error), error, error.__traceback__.tb_next)
        return 1
