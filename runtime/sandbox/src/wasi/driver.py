# The stateful-session driver, run as `python -I -c <this file>`.
# Protocol: each frame on stdin is "<byte length>\n<utf-8 code>"; after
# running it in one persistent globals dict, the driver flushes and writes
# "\0<nonce>:<exit status>\0" to stdout, which the host strips. The host
# takes the frame as over only when the driver then waits on stdin again.
def _serve():
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
        status = 0
        try:
            exec(compile(code, "<cell>", "exec"), cell)
        except SystemExit as stop:
            if stop.code is None:
                status = 0
            elif isinstance(stop.code, int):
                status = stop.code
            else:
                print(stop.code, file=sys.stderr)
                status = 1
        except BaseException as error:
            # Skip the driver's own frame so tracebacks start at the cell.
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        out.write("\0" + nonce + ":" + str(status) + "\0")
        out.flush()
_serve()
