# The stateful-session driver, run as `python -I -c <cell.py, then this
# file>` (`_stack_run_cell` comes from `../cell.py`).
# Protocol: each frame on stdin is "<byte length>\n<utf-8 code>"; after
# running it in one persistent globals dict, the driver flushes and writes
# "\0<nonce>:<exit status>\0" to stdout, which the host strips. The host
# takes the frame as over only when the driver then waits on stdin again.
def _serve():
    # `traceback` now, not after an error (a MemoryError could stop the
    # import, and the driver with it).
    import io, os, sys, traceback
    nonce = os.environ.pop("STACK_FRAME_NONCE", "")
    frames = sys.stdin.buffer
    sys.stdin = io.StringIO("")
    cell = {"__name__": "__main__", "__builtins__": __builtins__}
    out = sys.stdout
    while True:
        header = frames.readline()
        if not header:
            return
        code = frames.read(int(header)).decode("utf-8", "replace")
        # As a notebook runs a cell: a last bare expression's value shown.
        status = _stack_run_cell(code, "<cell>", cell)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        out.write("\0" + nonce + ":" + str(status) + "\0")
        out.flush()
_serve()
