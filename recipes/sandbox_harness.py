"""The trusted harness of :func:`esamp_agents.recipes.code_generation.run_tests`, run in the sandbox.

Never imported to run: the runner reads this file's source (``importlib.resources``) and starts
``python -I -c SOURCE REPORT_FD CPU_SECONDS MEMORY_BYTES FILE_SIZE_BYTES ENTRY_POINT`` in the
sandbox directory, so the child needs nothing but the standard library and its own source. It
applies the resource limits, reads ``program.py`` / ``tests.py``, compiles them, installs the
audit hook (:func:`guard`), then runs the program and the instrumented tests.

Reports go to the pipe ``REPORT_FD`` the parent passed, one line each: ``S`` started, ``P <i>``
assert i held, ``F <i> <why>`` assert i failed, ``E <why>`` stopped early, ``D`` done. Asserts
are numbered in ``ast.walk`` order, as the parent numbers them.
"""

import ast
import contextlib
import os
import resource
import signal
import sys
import traceback


def main():
    fd, cpu, mem, fsize = (int(v) for v in sys.argv[1:5])
    entry = sys.argv[5] or None

    def emit(line):
        os.write(fd, (line.replace("\n", " ")[:400] + "\n").encode("utf-8", "replace"))

    def limit(kind, soft, hard):
        _, cur_hard = resource.getrlimit(kind)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(kind, (soft, hard))

    limit(resource.RLIMIT_CORE, 0, 0)
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_FSIZE, fsize, fsize)
    if mem > 0:
        limit(resource.RLIMIT_AS, mem, mem)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-large writes raise OSError instead of killing
    emit("S")

    def describe(exc):
        try:
            text = str(exc)
        except BaseException:
            text = "<unprintable>"
        return type(exc).__name__ + (": " + text if text else "")

    with open("tests.py", encoding="utf-8") as f:
        tests_src = f.read()
    with open("program.py", encoding="utf-8") as f:
        program_src = f.read()
    tree = ast.parse(tests_src, "tests.py")
    asserts = [n for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    for i, node in enumerate(asserts):
        node._esamp_id = i
    has_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)

    class Instrument(ast.NodeTransformer):
        """Each ``assert TEST`` -> record whether TEST held (or what it raised), and carry on."""

        def visit_Assert(self, node):
            i = node._esamp_id
            new = ast.parse(
                "try:\n    _esamp_ok_ = bool(0)\nexcept BaseException as _esamp_exc_:\n"
                f"    _esamp_record_({i}, _esamp_exc_)\nelse:\n    _esamp_record_({i}, _esamp_ok_)\n"
            ).body[0]
            new.body[0].value.args[0] = node.test
            for sub in ast.walk(new):
                if sub is not node.test and not isinstance(sub, ast.expr_context):
                    ast.copy_location(sub, node)
            return new

    tests_code = compile(ast.fix_missing_locations(Instrument().visit(tree)), "tests.py", "exec")
    try:
        program_tree = ast.parse(program_src, "program.py")
        program_code = compile(program_tree, "program.py", "exec")
    except BaseException as exc:
        emit("E program does not compile: " + describe(exc))
        return
    functions = [n.name for n in program_tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

    state = {}

    def record(i, outcome):
        if outcome is True:
            if i not in state:
                state[i] = True
                emit(f"P {i}")
        elif state.get(i) is not False:
            state[i] = False
            emit(f"F {i} {'assertion failed' if outcome is False else describe(outcome)}")

    guard()
    namespace = {"__name__": "candidate", "__builtins__": __builtins__, "_esamp_record_": record}
    try:
        exec(program_code, namespace)
    except BaseException as exc:
        emit("E the program raised " + describe(exc))
        return
    namespace["_esamp_record_"] = record
    try:
        exec(tests_code, namespace)
    except BaseException as exc:
        emit("E the tests raised " + describe(exc))
        return
    if has_check and callable(namespace.get("check")):
        if entry is None and len(functions) == 1:
            entry = functions[0]
        if entry is None:
            emit(
                f"E check(candidate) needs entry_point: the program defines {len(functions)} "
                f"top-level functions {functions}"
            )
            return
        if not callable(namespace.get(entry)):
            emit(f"E entry_point {entry!r} is not a function the program defines")
            return
        try:
            namespace["check"](namespace[entry])
        except BaseException as exc:
            emit("E check() raised " + describe(exc))
            return
    emit("D")


def guard():
    """Audit hook: no processes, signals, sockets or ctypes calls; no file access outside the sandbox."""
    import os.path

    real = os.path.realpath
    sandbox = real(os.getcwd())
    report_fd = int(sys.argv[1])
    roots = {sandbox}
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path):
        if p:
            roots.add(real(p))
    readable = tuple(sorted(roots))
    proc_self = ("/proc/self", "/proc/thread-self", f"/proc/{os.getpid()}")
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/etc/localtime")
    denied_prefixes = ("subprocess.", "socket.", "pty.", "winreg.", "_winapi.", "msvcrt.")
    denied = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "os.startfile", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
        "sys.remote_exec", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
        "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at", "ctypes.addressof",
        "ctypes.set_errno", "ctypes.set_last_error", "ctypes.seh_exception", "ctypes.PyObj_FromPtr",
    }  # fmt: skip
    writes = {
        "os.remove", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
        "os.truncate", "os.symlink", "os.link", "os.mkfifo", "os.mknod", "os.chflags", "os.lchflags",
        "os.setxattr", "os.removexattr", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
        "shutil.copytree", "shutil.rmtree", "shutil.move", "shutil.chown", "shutil.make_archive",
        "shutil.unpack_archive",
    }  # fmt: skip
    reads = {"os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.listxattr", "os.getxattr"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, bases):
        return any(path == b or path.startswith(b.rstrip("/") + "/") for b in bases)

    def paths(args):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)):
                try:
                    p = os.fsdecode(os.fspath(a))
                except Exception:
                    continue
                yield real(p)

    def hook(event, args):
        if event in denied or event.startswith(denied_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "ctypes.dlopen" and args and args[0] is not None:
            raise PermissionError("sandbox: loading native libraries is not allowed")
        if event == "open":
            path, mode, flags = (*tuple(args), None, None, None)[:3]
            if isinstance(path, int):
                if path == report_fd:
                    raise PermissionError("sandbox: that file descriptor is reserved")
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            for p in paths((path,)):
                if inside(p, (sandbox,)) or p in devices:
                    continue
                if writing:
                    raise PermissionError(f"sandbox: writing outside the sandbox is not allowed: {p}")
                if p.startswith("/proc/") and not inside(p, proc_self):
                    raise PermissionError(f"sandbox: reading other processes is not allowed: {p}")
                if not inside(p, readable) and not inside(p, proc_self):
                    raise PermissionError(f"sandbox: reading outside the sandbox is not allowed: {p}")
        elif event in writes:
            for p in paths(args):
                if not inside(p, (sandbox,)):
                    raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed: {p}")
        elif event in reads:
            for p in paths(args[:1]):
                if not inside(p, readable) and not inside(p, proc_self):
                    raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed: {p}")

    sys.addaudithook(hook)


if __name__ == "__main__":  # as ``python -I -c SOURCE``; importing this module runs nothing
    try:
        main()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(0)
