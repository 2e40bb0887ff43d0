"""The processes behind `instructjax.codex.sandbox` (standard library only).

This file runs in two roles, never imported by the untrusted side from the package:

* ``python -s -S -P sandbox_child.py worker``: the TRUSTED worker. It runs outside the
  sandbox, executes the problem's prompt + test code itself and calls ``check(proxy)``;
  the proxy forwards each call to the candidate as plain data and decodes the answer
  with a strict decoder. It owns one sandbox (a zygote) and restarts it when it dies.
* ``python -s -S -P -c <this source> zygote ...`` inside bubblewrap: the ZYGOTE. It
  makes itself non-dumpable and forks one fresh CANDIDATE process per sample, which
  drops into rlimits and a seccomp filter, runs prompt + completion and serves calls
  over its own socket. Between samples the zygote kills every other process in the
  sandbox's PID namespace and wipes the tmpfs work dir.

Wire format (both directions): 4-byte big-endian length + a JSON array. Values are
tagged so that only exact builtin types travel: None/bool/int/str are JSON scalars;
["f", repr] float (inf/nan too), ["y", hex] bytes, ["l", ...] list, ["t", ...] tuple,
["s", ...] set, ["z", ...] frozenset, ["d", k1, v1, ...] dict. Anything else is rejected.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time

MAX_MSG = 1 << 22          # bytes per message
MAX_DEPTH = 100            # nesting of decoded values
EXIT_SETUP = 71            # candidate could not be set up (infrastructure)
EXIT_OOM = 72              # candidate ran out of memory inside the serve loop
HEADER = struct.Struct(">I")


# --------------------------------------------------------------------------- codec
class WireError(Exception):
    """A value that is not plain data, or a malformed message."""


def encode_plain(v, depth=0):
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    t = type(v)
    if v is None or t is bool or t is str or t is int:
        return v
    if t is float:
        return ["f", repr(v)]
    if t is bytes:
        return ["y", v.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "s", frozenset: "z"}[t]
        return [tag] + [encode_plain(x, depth + 1) for x in v]
    if t is dict:
        out = ["d"]
        for k, x in v.items():
            out.append(encode_plain(k, depth + 1))
            out.append(encode_plain(x, depth + 1))
        return out
    raise WireError(f"not plain data: {t.__name__}")


def _reject(*_):
    raise WireError("forbidden JSON construct")


def decode_plain(v, depth=0):
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    t = type(v)
    if v is None or t is bool or t is str or t is int:
        return v
    if t is not list or not v or type(v[0]) is not str:
        raise WireError("malformed value")
    tag, items = v[0], v[1:]
    if tag == "f" or tag == "y":
        if len(items) != 1 or type(items[0]) is not str or len(items[0]) > (40 if tag == "f" else MAX_MSG):
            raise WireError("malformed scalar")
        try:
            return float(items[0]) if tag == "f" else bytes.fromhex(items[0])
        except ValueError as e:
            raise WireError(str(e)) from None
    vals = [decode_plain(x, depth + 1) for x in items]
    try:
        if tag == "l":
            return vals
        if tag == "t":
            return tuple(vals)
        if tag == "s":
            return set(vals)
        if tag == "z":
            return frozenset(vals)
        if tag == "d" and len(vals) % 2 == 0:
            return dict(zip(vals[0::2], vals[1::2]))
    except TypeError as e:  # unhashable key or element
        raise WireError(str(e)) from None
    raise WireError(f"unknown tag {tag!r}")


def loads_msg(data: bytes) -> list:
    """Strictly parse one message: a JSON array, no objects, no float literals."""
    if len(data) > MAX_MSG:
        raise WireError("message too large")
    try:
        msg = json.loads(data, parse_float=_reject, parse_constant=_reject,
                         object_pairs_hook=_reject)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise WireError(f"bad message: {e}"[:200]) from None
    if type(msg) is not list or not msg or type(msg[0]) is not str:
        raise WireError("bad message shape")
    return msg


def frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return HEADER.pack(len(data)) + data


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame_blocking(sock):
    """Used by the candidate only (it has no deadline of its own)."""
    hdr = _recv_exact(sock, 4)
    if hdr is None:
        return None
    (n,) = HEADER.unpack(hdr)
    if n > MAX_MSG:
        return None
    return _recv_exact(sock, n)


# --------------------------------------------------------------------------- zygote
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 38, 22
_PRELOAD = ("math", "re", "collections", "itertools", "functools", "typing", "string",
            "heapq", "bisect", "hashlib", "random", "statistics", "fractions", "decimal",
            "operator", "copy", "io", "ctypes", "resource", "stat")


def zygote_main(argv):
    """argv: ctrl_fd workdir in_pidns(0/1) bpf_hex."""
    import ctypes
    import resource  # noqa: F401  (preloaded for the candidate)
    ctrl_fd, workdir, in_pidns, bpf_hex = int(argv[0]), argv[1], argv[2] == "1", argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_DUMPABLE")
    for mod in _PRELOAD:
        try:
            __import__(mod)
        except ImportError:
            pass
    bpf = bytes.fromhex(bpf_hex)
    bpf_buf = ctypes.create_string_buffer(bpf, len(bpf)) if bpf else None

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(bpf) // 8, ctypes.addressof(bpf_buf)) if bpf else None
    ctrl = socket.socket(fileno=ctrl_fd)
    import gc
    gc.collect()
    gc.freeze()  # so the candidates' collections do not copy-on-write every page
    ctrl.send(json.dumps(["hello", os.getpid()]).encode())
    child = None
    while True:
        msg, fds, _, _ = socket.recv_fds(ctrl, 1 << 16, 4)
        if not msg:
            os._exit(0)
        req = json.loads(msg)
        if req[0] == "end" and child is not None:
            status = _reap(child, grace=0.25 if req[2] else 0.0)
            child = None
            if in_pidns:
                _kill_others()
            else:
                try:
                    os.killpg(status["pid"], signal.SIGKILL)
                except OSError:
                    pass
            status["clean"] = _wipe(workdir)
            ctrl.send(json.dumps(["ended", status]).encode())
        elif req[0] != "prep":
            for fd in fds:
                os.close(fd)
            if req[0] != "quit":
                ctrl.send(json.dumps(["error", f"bad request {req[0]!r}"]).encode())
            os._exit(0 if req[0] == "quit" else 1)
        if len(fds) == 2 and child is None:
            # Pre-fork the next sample's candidate: it confines itself now and then waits
            # for its program, so fork + setup stay off the next sample's critical path.
            pid = os.fork()
            if pid == 0:
                _candidate(fds[0], fds[1], req[1], workdir, libc, fprog, ctypes)
            child = pid
        for fd in fds:
            os.close(fd)


def _reap(pid, grace):
    """Reap the candidate; if it is still alive after `grace` seconds, SIGKILL it first.

    The worker asks for a grace period when it saw the candidate's channel close: the
    socket closes while the process is still tearing down, before its exit status is
    known."""
    killed = False
    wpid, st, ru = os.wait4(pid, os.WNOHANG)
    if wpid == 0 and grace > 0:
        try:
            pidfd = os.pidfd_open(pid)
            try:
                select.select([pidfd], [], [], grace)
            finally:
                os.close(pidfd)
        except OSError:
            time.sleep(0.01)
        wpid, st, ru = os.wait4(pid, os.WNOHANG)
    if wpid == 0:
        killed = True
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        wpid, st, ru = os.wait4(pid, 0)
    return {"pid": pid, "killed": killed,
            "exit": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None,
            "signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else None,
            "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}


def _kill_others():
    """Inside the sandbox's own PID namespace: SIGKILL everything but init and us."""
    me = os.getpid()
    for _ in range(3):
        found = False
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in (1, me):
                found = True
                try:
                    os.kill(int(name), signal.SIGKILL)
                except OSError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not found:
            return
        time.sleep(0.001)


def _wipe(workdir):
    import stat as st_mod

    def rm(path, depth):
        if depth > 200:
            raise OSError("directory tree too deep")
        if st_mod.S_ISDIR(os.lstat(path).st_mode):
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                rm(os.path.join(path, name), depth + 1)
            os.rmdir(path)
        else:
            os.unlink(path)

    try:
        os.chmod(workdir, 0o700)
        for name in os.listdir(workdir):
            rm(os.path.join(workdir, name), 0)
        return True
    except (OSError, RecursionError):
        return False


# --------------------------------------------------------------------------- candidate
def _candidate(data_fd, out_fd, lim, workdir, libc, fprog, ctypes):
    """Forked child: confine itself, then run the untrusted code. Never returns."""
    try:
        import resource
        os.setsid()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(data_fd, 3)
        os.closerange(4, 1 << 20)
        os.chdir(workdir)
        mem = lim["memory_mb"] << 20
        cpu = int(lim["cpu_s"])
        for res, val in ((resource.RLIMIT_AS, (mem, mem)),
                         (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_FSIZE, (lim["file_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if fprog is not None:
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError("PR_SET_NO_NEW_PRIVS")
            if libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) != 0:
                raise OSError("PR_SET_SECCOMP")
        sock = socket.socket(fileno=3)
    except BaseException:
        os._exit(EXIT_SETUP)
    try:
        _serve(sock)
    except MemoryError:
        os._exit(EXIT_OOM)
    except BaseException:
        pass
    os._exit(0)


def describe_exception(e):
    try:
        return f"{type(e).__name__}: {e}"[:400]
    except BaseException:
        return type(e).__name__


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _serve(sock):
    first = recv_frame_blocking(sock)
    if first is None:
        return
    _, code, entry, nonce = json.loads(first)
    g = {}
    try:
        exec(compile(code, "<candidate>", "exec"), g)
        fn = g.get(entry)
        if not callable(fn):
            raise NameError(f"entry point {entry!r} is not defined")
    except MemoryError as e:
        reply = ["load_error", nonce, "memory", describe_exception(e)]
    except Exception as e:
        reply = ["load_error", nonce, "exception", describe_exception(e)]
    except BaseException as e:
        reply = ["load_error", nonce, "exit", describe_exception(e)]
    else:
        reply = ["ready", nonce]
    _flush()
    sock.sendall(frame(reply))
    if reply[0] != "ready":
        return
    while True:
        data = recv_frame_blocking(sock)
        if data is None:
            return
        _, nonce, args, kwargs = loads_msg(data)
        args = decode_plain(args)
        kwargs = decode_plain(kwargs)
        try:
            reply = ["ret", nonce, encode_plain(fn(*args, **kwargs))]
        except WireError as e:
            reply = ["nonplain", nonce, describe_exception(e)]
        except MemoryError as e:
            reply = ["raise", nonce, "memory", "MemoryError", describe_exception(e)]
        except Exception as e:
            reply = ["raise", nonce, "exception", type(e).__name__, describe_exception(e)]
        except BaseException as e:
            reply = ["raise", nonce, "exit", type(e).__name__, describe_exception(e)]
        _flush()
        try:
            payload = frame(reply)
        except (ValueError, RecursionError) as e:
            payload = frame(["nonplain", nonce, describe_exception(e)])
        sock.sendall(payload)


if __name__ == "__main__":
    zygote_main(sys.argv[2:])  # argv: -c zygote ctrl_fd workdir in_pidns bpf_hex
