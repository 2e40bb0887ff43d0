"""The trusted worker behind `instructjax.codex.sandbox` (standard library only).

Runs as ``python -s -S -P sandbox_worker.py``, outside the sandbox. For each job it runs
the problem's prompt + test code itself and calls ``check(proxy)``; the proxy forwards
each call's arguments to the candidate as plain data and decodes the answer with the
strict codec of sandbox_child.py, so no candidate object ever reaches this process. It
owns one sandbox (a zygote, see sandbox_child.py) and restarts it when it dies. Protocol
with the evaluator: one JSON spec line, then one JSON job per line on stdin, one JSON
result per line on the original stdout.
"""

from __future__ import annotations

import builtins
import json
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -P leaves it out
from sandbox_child import (EXIT_OOM, EXIT_SETUP, HEADER, MAX_MSG, WireError,  # noqa: E402
                           decode_plain, describe_exception, encode_plain, frame, loads_msg)


class _Deadline(BaseException):
    pass


class _Verdict(BaseException):
    """Ends the harness with a fixed label; BaseException so tests cannot swallow it."""

    def __init__(self, label, error):
        super().__init__(error)
        self.label, self.error = label, error


class _Gone(BaseException):
    """The candidate closed its channel (usually: it died)."""


class _ZygoteDied(Exception):
    pass


class CandidateError(Exception):
    """An exception raised inside the candidate, re-raised in the harness."""


def _candidate_exception(name, text):
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(text)
        except Exception:
            pass
    return CandidateError(text)


class _Chan:
    """The worker's end of one sample's channel, plus the candidate's output pipe."""

    def __init__(self, sock, out_fd, out_limit):
        self.sock, self.out_fd, self.out_limit = sock, out_fd, out_limit
        self.buf = bytearray()
        self.out = bytearray()
        self.out_total = 0

    def send(self, obj):
        try:
            self.sock.sendall(frame(obj))
        except OSError:  # EPIPE / ECONNRESET: the candidate is gone
            raise _Gone() from None

    def _read_out(self):
        try:
            chunk = os.read(self.out_fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            # Forget the fd before closing it: a deadline signal raised between the two would
            # otherwise leave a closed number here, and its reuse would be closed twice.
            fd, self.out_fd = self.out_fd, None
            os.close(fd)
            return False
        self.out_total += len(chunk)
        if len(self.out) < 4096:
            self.out += chunk[:4096 - len(self.out)]
        if self.out_total > self.out_limit:
            raise _Verdict("crashed", f"output limit exceeded ({self.out_limit} bytes)")
        return True

    def drain_out(self):
        while self.out_fd is not None and self._read_out():
            pass

    def recv(self, deadline):
        while True:
            if len(self.buf) >= 4:
                (n,) = HEADER.unpack_from(self.buf)
                if n > MAX_MSG:
                    raise _Verdict("failed", "candidate sent an oversized message")
                if len(self.buf) >= 4 + n:
                    data = bytes(self.buf[4:4 + n])
                    del self.buf[:4 + n]
                    self.drain_out()
                    try:
                        return loads_msg(data)
                    except WireError as e:
                        raise _Verdict("failed", f"candidate sent a malformed message: {e}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline()
            fds = [self.sock] + ([self.out_fd] if self.out_fd is not None else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self.out_fd is not None and self.out_fd in ready:
                self._read_out()
            if self.sock in ready:
                try:
                    chunk = self.sock.recv(1 << 16)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise _Gone()
                self.buf += chunk

    def output_text(self):
        return self.out.decode("utf-8", "replace")


class _Proxy:
    """Stands in for the candidate function inside the trusted test code."""

    def __init__(self, chan, deadline):
        self._chan, self._deadline = chan, deadline
        self.oom = False

    def __call__(self, *args, **kwargs):
        nonce = os.urandom(8).hex()
        try:
            enc = ["call", nonce, encode_plain(list(args)), encode_plain(dict(kwargs))]
        except WireError as e:
            raise _Verdict("sandbox_error", f"test passes a non-plain argument: {e}") from None
        self._chan.send(enc)
        msg = self._chan.recv(self._deadline)
        kind = msg[0]
        if len(msg) < 2 or msg[1] != nonce:
            raise _Verdict("failed", "candidate broke the call protocol (unexpected message)")
        if kind == "ret" and len(msg) == 3:
            try:
                return decode_plain(msg[2])
            except WireError as e:
                raise _Verdict("failed", f"candidate returned non-plain data: {e}") from None
        if kind == "nonplain":
            raise _Verdict("failed", f"candidate returned non-plain data: {str(msg[2:])[:300]}")
        if kind == "raise" and len(msg) == 5 and all(type(x) is str for x in msg[2:]):
            if msg[2] == "memory":
                self.oom = True
                raise _Verdict("out_of_memory", msg[4])
            if msg[2] == "exit":
                raise _Verdict("crashed", f"candidate raised {msg[4]}")
            raise _candidate_exception(msg[3], msg[4])
        raise _Verdict("failed", "candidate broke the call protocol")


def _on_alarm(signum, frame):
    raise _Deadline()


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:  # a real-time signal has no name
        return str(sig)


class Worker:
    def __init__(self, spec):
        self.spec = spec
        self.zyg = None
        self.zerr = None
        self.next = None  # (socket, output pipe) of the pre-forked candidate
        self.codes = {}

    # -- zygote management
    def _kill_cgroup(self):
        cg = self.spec.get("cgroup")
        if not cg:
            return
        try:
            for _ in range(20):
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
                if not pids:
                    return
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.005)
        except OSError:
            pass

    def stop_zygote(self):
        if self.next is not None:
            self.next[0].close()
            os.close(self.next[1])
            self.next = None
        if self.zyg is None:
            return
        proc, ctrl = self.zyg
        self.zyg = None
        try:
            ctrl.send(json.dumps(["quit"]).encode())
        except OSError:
            pass
        ctrl.close()
        try:
            proc.wait(timeout=2)
        except Exception:
            proc.kill()
            proc.wait()
        self._kill_cgroup()

    def start_zygote(self):
        import subprocess
        import tempfile
        self.stop_zygote()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [a.replace("{fd}", str(theirs.fileno())) for a in self.spec["zygote_argv"]]
        cg = self.spec.get("cgroup")

        def preexec():
            if cg:
                try:
                    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
                except OSError:
                    pass
        if self.zerr is None:
            self.zerr = tempfile.TemporaryFile()
        self.zerr.seek(0)
        self.zerr.truncate()
        proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=self.zerr,
                                preexec_fn=preexec if cg else None, start_new_session=True,
                                cwd=self.spec.get("cwd"), env=self.spec.get("env"))
        theirs.close()
        self.zyg = (proc, ours)
        msg = self._zrecv(timeout=30)
        if msg[0] != "hello":
            raise _ZygoteDied(f"unexpected zygote greeting {msg!r}")

    def _zrecv(self, timeout):
        proc, ctrl = self.zyg
        ready, _, _ = select.select([ctrl], [], [], timeout)
        if not ready:
            raise _ZygoteDied("zygote did not answer")
        data = ctrl.recv(1 << 16)
        if not data:
            self.zerr.seek(0)
            tail = self.zerr.read()[-300:].decode("utf-8", "replace")
            raise _ZygoteDied(f"sandbox exited: {tail}")
        return json.loads(data)

    # -- one sample
    def _compiled(self, job):
        key = (job["task_id"], job["prompt"], job["test"])
        code = self.codes.get(key)
        if code is None:
            if len(self.codes) > 512:
                self.codes.clear()
            name = f"<test {job['task_id']}>"
            try:
                code = compile(job["prompt"] + "\n" + job["test"] + "\n", name, "exec")
            except SyntaxError:  # a prompt that ends in a bare signature
                try:
                    code = compile(job["prompt"] + "    pass\n\n" + job["test"] + "\n", name, "exec")
                except SyntaxError as e:
                    raise _Verdict("sandbox_error", f"cannot compile the problem's test: {e}") from None
            self.codes[key] = code
        return code

    def run_job(self, job):
        t0 = time.monotonic()
        for attempt in range(2):
            try:
                if self.zyg is None:
                    self.start_zygote()
            except (_ZygoteDied, OSError) as e:
                self.stop_zygote()
                return "sandbox_error", f"could not start the sandbox: {e}"[:500], t0
            try:
                label, error, started = self._run_once(job)
            except (_ZygoteDied, OSError) as e:
                self.stop_zygote()
                if attempt == 0:
                    continue
                return "crashed", f"the sandbox died twice running this candidate: {e}"[:500], t0
            return label, error, t0
        raise AssertionError("unreachable")

    def _prep_message(self, op, gone=False):
        """Send `op` with a fresh channel for the next candidate, which the zygote pre-forks."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        try:
            socket.send_fds(self.zyg[1], [json.dumps([op, self.spec["limits"], gone]).encode()],
                            [theirs.fileno(), out_w])
        except OSError:
            ours.close()
            os.close(out_r)
            raise
        finally:
            theirs.close()
            os.close(out_w)
        self.next = (ours, out_r)

    def _run_once(self, job):
        spec = self.spec
        t0 = time.monotonic()
        deadline = t0 + spec["timeout_s"]
        if self.next is None:
            self._prep_message("prep")
        ours, out_r = self.next
        self.next = None
        chan = _Chan(ours, out_r, spec["output_bytes"])
        try:
            try:
                label, error, gone = self._judge(job, chan, deadline)
            except _Deadline:  # the alarm fired while a verdict was being handled
                label, error, gone = "timeout", f"wall time limit ({spec['timeout_s']} s) exceeded", False
            ours.close()
            self._prep_message("end", gone)
            end = self._zrecv(timeout=30)
            if end[0] != "ended":
                raise _ZygoteDied(f"unexpected zygote reply {end!r}")
            status = end[1]
            if gone:
                try:
                    chan.drain_out()
                except _Verdict:
                    pass
                label, error = self._death_label(status, chan.output_text(), label, error)
        finally:
            ours.close()
            if chan.out_fd is not None:
                fd, chan.out_fd = chan.out_fd, None
                os.close(fd)
        if not status.get("clean"):
            self.stop_zygote()  # a fresh sandbox for the next sample
        if label != "passed" and not error:
            error = label
        if label != "passed":
            out = chan.output_text().strip()
            if out:
                error = f"{error}\n--- output ---\n{out}"
        return label, error[:500] if label != "passed" else "", t0

    def _death_label(self, st, output, label, error):
        """The candidate's channel closed; decide from the zygote's wait status."""
        sig, code = st.get("signal"), st.get("exit")
        if label is not None:  # e.g. it announced a load error, then exited
            return label, error
        if st.get("killed"):
            return "crashed", "candidate closed its channel to the evaluator"
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and st["cpu"] >= self.spec["limits"]["cpu_s"] - 0.05):
            return "timeout", "CPU time limit exceeded"
        if code == EXIT_SETUP:
            return "sandbox_error", "candidate process could not be confined"
        if code == EXIT_OOM or "MemoryError" in output:
            return "out_of_memory", "out of memory"
        if sig == signal.SIGXFSZ:
            return "crashed", "file size limit exceeded"
        if sig is not None:
            return "crashed", f"candidate killed by {_signal_name(sig)}"
        return "crashed", f"candidate exited with status {code}"

    def _judge(self, job, chan, deadline):
        """Returns (label, error, gone); label None when the candidate went away."""
        proxy = None
        try:
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))
            nonce = os.urandom(8).hex()
            chan.send(["prog", job["prompt"] + job["completion"], job["entry_point"], nonce])
            msg = chan.recv(deadline)
            if msg[0] == "load_error" and len(msg) == 4 and msg[1] == nonce and all(type(x) is str for x in msg[2:]):
                label = "out_of_memory" if msg[2] == "memory" else "crashed"
                return label, msg[3], True
            if msg != ["ready", nonce]:
                return "failed", "candidate broke the protocol", False
            import random
            random.seed(0)
            g = {}
            try:
                exec(self._compiled(job), g)
            except (_Deadline, _Verdict):
                raise
            except Exception as e:
                raise _Verdict("sandbox_error", f"the problem's test code failed: {describe_exception(e)}") from None
            proxy = _Proxy(chan, deadline)
            g[job["entry_point"]] = proxy
            g["check"](proxy)
            return "passed", "", False
        except _Deadline:
            return "timeout", f"wall time limit ({self.spec['timeout_s']} s) exceeded", False
        except _Verdict as v:
            return v.label, v.error, False
        except _Gone:
            return None, "", True
        except AssertionError as e:
            return ("out_of_memory" if proxy and proxy.oom else "failed"), f"AssertionError: {e}", False
        except Exception as e:
            return ("out_of_memory" if proxy and proxy.oom else "failed"), describe_exception(e), False
        except BaseException as e:
            return "sandbox_error", f"test harness raised {describe_exception(e)}", False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def worker_main():
    """Trusted worker: one JSON spec line, then one JSON job per line on stdin.

    It exits at EOF on stdin, so it outlives a dead evaluator by at most one sample. (No
    PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits.)
    """
    proto = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    stdin = sys.stdin.buffer
    spec = json.loads(stdin.readline())
    signal.signal(signal.SIGALRM, _on_alarm)
    worker = Worker(spec)
    try:
        for line in stdin:
            job = json.loads(line)
            if job.get("op") == "quit":
                break
            label, error, t0 = worker.run_job(job)
            proto.write(json.dumps({"label": label, "error": error,
                                    "duration_s": time.monotonic() - t0}) + "\n")
            proto.flush()
    finally:
        worker.stop_zygote()


if __name__ == "__main__":
    worker_main()
