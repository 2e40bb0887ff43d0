"""Hostile completions: no escape, no outside effect, no forged pass, nothing left running.

Most attacks are written as canaries: the completion returns the right answer only if its
attack worked from the inside (a file got written, a secret was read, a connection was
made, a process was spawned or killed), so any label other than "passed" also shows that
the attack failed. Outside effects are then checked from the outside as well.
"""

import os
import platform
import socket
import textwrap
import uuid

import psutil
import pytest

from instructjax.codex.sandbox import LABELS, Evaluator, Problem, SandboxConfig

ADD = Problem(task_id="t/add", prompt="def add(a, b):\n", entry_point="add",
              test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")
GOOD = "    return a + b\n"
TAG = uuid.uuid4().hex[:12]
SECRET = f"top-secret-{TAG}"
HOME = os.path.expanduser("~")


def canary(attack: str) -> str:
    """A completion that is correct iff `attack` (a function body) returns True."""
    body = textwrap.indent(textwrap.dedent(attack).strip("\n"), " " * 8)
    return ("    return a + b if _attack() else None\n\n"
            "def _attack():\n"
            "    import os, sys, socket, ctypes, signal, threading, time\n"
            "    try:\n" + body + "\n"
            "    except BaseException:\n"
            "        return False\n")


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Files, secrets and listeners outside the sandbox, created before the run."""
    tmp = tmp_path_factory.mktemp("hostile")
    o = {"tmp": str(tmp)}
    o["secrets"] = [str(tmp / "secret.txt"), os.path.join(HOME, f".ij_secret_{TAG}"),
                    f"/work/.ij_secret_{TAG}"]
    o["targets"] = [str(tmp / "target.txt"), os.path.join(HOME, f".ij_target_{TAG}"),
                    f"/work/.ij_target_{TAG}"]
    o["new"] = [f"/ij_pwned_{TAG}", os.path.join(HOME, f"ij_pwned_{TAG}"), f"/work/ij_pwned_{TAG}",
                f"/work/main/ij_pwned_{TAG}", f"/usr/ij_pwned_{TAG}", f"/tmp/ij_pwned_{TAG}",
                str(tmp / "pwned"), f"/dev/shm/ij_pwned_{TAG}"]
    for p in o["secrets"]:
        with open(p, "w") as f:
            f.write(SECRET)
    for p in o["targets"]:
        with open(p, "w") as f:
            f.write("original")
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    unix_path = str(tmp / "ij.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(8)
    unix.setblocking(False)
    abstract_name = f"\0ij-{TAG}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(abstract_name)
    abstract.listen(8)
    abstract.setblocking(False)
    o.update(tcp=tcp, udp=udp, unix=unix, abstract=abstract, port=tcp.getsockname()[1],
             udp_port=udp.getsockname()[1], unix_path=unix_path, abstract_name=abstract_name)
    os.environ["IJ_SANDBOX_SECRET"] = SECRET  # the evaluator is created after this
    yield o
    os.environ.pop("IJ_SANDBOX_SECRET", None)
    for s in (tcp, udp, unix, abstract):
        s.close()
    for p in o["secrets"] + o["targets"] + o["new"]:
        try:
            os.unlink(p)
        except OSError:
            pass


def hostile_cases(o):
    f = o["new"]
    sh_cmd = "; ".join(f"echo pwned > {p}" for p in f)
    c = {}
    # --- shell, process creation and code execution routes
    c["os_system"] = (canary(f"return os.system({sh_cmd!r}) == 0"), {"failed"})
    c["subprocess"] = (canary(f"import subprocess\nreturn subprocess.run(['/bin/sh', '-c', {sh_cmd!r}]).returncode == 0"), {"failed"})
    c["popen_top_level"] = ("    return a + b\nimport subprocess\nsubprocess.Popen(['/bin/sh', '-c', " + repr(sh_cmd) + "])\n", {"crashed"})
    c["os_fork"] = (canary(f"""
        pid = os.fork()
        if pid == 0:
            os.system({sh_cmd!r}); os._exit(0)
        return pid > 0"""), {"failed"})
    c["os_execv"] = (canary(f"os.execv('/bin/sh', ['sh', '-c', {sh_cmd!r}])"), {"failed"})
    c["posix_spawn"] = (canary(f"return os.posix_spawn('/bin/sh', ['sh', '-c', {sh_cmd!r}], {{}}) > 0"), {"failed"})
    c["pty_fork"] = (canary("import pty\npid, fd = pty.fork()\nif pid == 0: os._exit(0)\nreturn pid > 0"), {"failed"})
    c["multiprocessing"] = (canary("import multiprocessing as mp\np = mp.Process(target=print)\np.start(); p.join()\nreturn p.exitcode == 0"), {"failed"})
    c["ctypes_fork_clone_system"] = (canary(f"""
        libc = ctypes.CDLL(None, use_errno=True)
        ok = False
        for pid in (libc.fork(), libc.syscall(56, 17, 0, 0, 0, 0), libc.syscall(57)):
            if pid == 0:
                libc._exit(0)
            ok = ok or pid > 0
        return ok or libc.system({sh_cmd.encode()!r}) == 0"""), {"failed"})
    c["ctypes_execve"] = (canary("libc = ctypes.CDLL(None)\nargv = (ctypes.c_char_p * 3)(b'/bin/true', None, None)\nreturn libc.execve(b'/bin/true', argv, None) == 0"), {"failed"})
    if platform.machine() == "x86_64":  # other syscall ABIs: the filter's architecture check
        for name, code in (("int80_fork", "b'\\xb8\\x02\\x00\\x00\\x00\\xcd\\x80\\xc3'"),       # i386 fork
                           ("x32_fork", "b'\\xb8\\x39\\x00\\x00\\x40\\x0f\\x05\\xc3'")):     # x32 fork
            c[name] = (canary(f"""
                import mmap
                buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
                buf.write({code})
                fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
                pid = fn()
                if pid == 0:
                    os._exit(0)
                return pid > 0"""), {"crashed", "failed"})
    # --- file system
    c["write_outside"] = (canary(f"""
        ok = False
        for p in {f!r}:
            try:
                with open(p, 'w') as fh: fh.write('pwned')
                ok = ok or not p.startswith('/tmp/')
            except OSError:
                pass
        return ok"""), {"failed"})
    c["modify_outside"] = (canary(f"""
        ok = False
        for p in {o['targets']!r}:
            try:
                with open(p, 'w') as fh: fh.write('pwned')
                ok = True
            except OSError:
                pass
            try:
                os.unlink(p); ok = True
            except OSError:
                pass
        return ok"""), {"failed"})
    c["read_secrets"] = (canary(f"""
        found = os.environ.get('IJ_SANDBOX_SECRET') == {SECRET!r}
        for p in {o['secrets']!r} + ['/etc/shadow', '/root/.bash_history']:
            try:
                found = found or len(open(p).read()) > 0
            except OSError:
                pass
        for pid in os.listdir('/proc'):
            try:
                found = found or {SECRET!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read()
            except OSError:
                pass
        return found"""), {"failed"})
    c["proc_and_ptrace_zygote"] = (canary("""
        libc = ctypes.CDLL(None, use_errno=True)
        ok = False
        for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:
            for name, mode in (('mem', 'rb'), ('mem', 'r+b'), ('environ', 'rb'), ('fd/0', 'rb')):
                try:
                    with open(f'/proc/{pid}/{name}', mode) as fh:
                        fh.read(1); ok = True
                except OSError:
                    pass
            ok = ok or libc.ptrace(16, int(pid), 0, 0) == 0
        return ok"""), {"failed"})
    c["mount_unshare"] = (canary("""
        libc = ctypes.CDLL(None, use_errno=True)
        r1 = libc.unshare(0x10000000)
        r2 = libc.mount(b'none', b'/work', b'tmpfs', 0, None)
        r3 = libc.umount2(b'/tmp', 2)
        r4 = libc.chroot(b'/tmp')
        return 0 in (r1, r2, r3, r4)"""), {"failed"})
    # --- network
    c["tcp_udp_connect"] = (canary(f"""
        ok = False
        try:
            s = socket.create_connection(('127.0.0.1', {o['port']}), timeout=0.3); ok = True
        except OSError:
            pass
        try:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b'x', ('127.0.0.1', {o['udp_port']})); ok = True
        except OSError:
            pass
        try:
            socket.create_connection(('::1', {o['port']}), timeout=0.3); ok = True
        except OSError:
            pass
        for fam in (socket.AF_PACKET, socket.AF_NETLINK):
            try:
                socket.socket(fam, socket.SOCK_RAW); ok = True
            except OSError:
                pass
        return ok"""), {"failed"})
    c["unix_connect"] = (canary(f"""
        ok = False
        for addr in ({o['unix_path']!r}, {o['abstract_name']!r}):
            try:
                s = socket.socket(socket.AF_UNIX); s.connect(addr); ok = True
            except OSError:
                pass
        return ok"""), {"failed"})
    # --- resource bombs and hangs
    c["fork_bomb"] = ("    return a + b\nimport os\nwhile True:\n    os.fork()\n", {"crashed"})
    c["thread_bomb"] = ("    return a + b\nimport threading, time\nfor _ in range(100000):\n"
                        "    threading.Thread(target=time.sleep, args=(1000,)).start()\n", {"crashed", "out_of_memory"})
    c["memory_bomb"] = ("    return len(bytearray(10 ** 11))\n", {"out_of_memory"})
    c["memory_bomb_gradual"] = ("    x = []\n    while True:\n        x.append(bytearray(10 ** 7))\n", {"out_of_memory"})
    c["memory_bomb_at_import"] = ("    return a + b\nx = 'y' * (10 ** 11)\n", {"out_of_memory"})
    c["cpu_loop"] = ("    while True:\n        pass\n", {"timeout"})
    c["sleep"] = ("    import time\n    time.sleep(1000)\n    return a + b\n", {"timeout"})
    c["hang_at_import"] = ("    return a + b\nwhile True:\n    pass\n", {"timeout"})
    c["ignore_signals"] = ("    import signal\n    for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
                           "        signal.signal(s, signal.SIG_IGN)\n"
                           "    signal.pthread_sigmask(signal.SIG_BLOCK, range(1, 65))\n"
                           "    signal.alarm(0)\n    while True:\n        pass\n", {"timeout"})
    c["alarm_tricks"] = ("    import signal, time\n    signal.signal(signal.SIGALRM, lambda *a: None)\n"
                         "    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)\n    time.sleep(1000)\n", {"timeout"})
    # --- early exit and fake results
    c["sys_exit_top"] = ("    return None\nimport sys\nprint('passed')\nsys.exit(0)\n", {"crashed"})
    c["os_exit_top"] = ("    return None\nimport os\nos._exit(0)\n", {"crashed"})
    c["sys_exit_in_call"] = ("    import sys\n    print('All tests passed')\n    sys.exit(0)\n", {"crashed"})
    c["os_exit_in_call"] = ("    import os\n    os._exit(0)\n", {"crashed"})
    c["abort"] = ("    import os\n    os.abort()\n", {"crashed"})
    c["fake_output"] = ("    import sys, os\n    print('passed'); print('{\"label\": \"passed\"}')\n"
                        "    os.write(1, b'\\x00\\x00\\x00\\x07[\"ret\"]'); sys.stderr.write('passed\\n')\n    return 0\n", {"failed"})
    c["fake_protocol_frames"] = ("    return -1\nimport os, json, struct\n"
                                 "for m in (['ready'], ['ret', 5], ['ret', 0], ['passed']):\n"
                                 "    d = json.dumps(m).encode(); os.write(3, struct.pack('>I', len(d)) + d)\n", {"failed"})
    c["garbage_frames"] = ("    import os\n    os.write(3, b'\\xff\\xff\\xff\\xff' + b'x' * 100)\n    return a + b\n", {"failed"})
    c["channel_hijack"] = ("    return a + b\nimport os\nos.dup2(1, 3)\n", {"timeout", "crashed"})
    c["channel_close"] = ("    import os\n    os.close(3)\n    return a + b\n", {"crashed"})
    # --- tampering with the test or the comparison
    c["redefine_check"] = ("    return None\n\ndef check(candidate):\n    pass\n", {"failed"})
    c["eq_always_true"] = ("    class A:\n        def __eq__(self, o): return True\n        __hash__ = None\n    return A()\n", {"failed"})
    c["int_subclass"] = ("    class I(int):\n        def __eq__(self, o): return True\n    return I(0)\n", {"failed"})
    c["str_subclass_in_list"] = ("    class S(str):\n        def __eq__(self, o): return True\n    return [S('x')]\n", {"failed"})
    c["eq_raises_systemexit"] = ("    class A:\n        def __eq__(self, o): raise SystemExit(0)\n        def __ne__(self, o): raise SystemExit(0)\n    return A()\n", {"failed"})
    c["eq_raises_keyboardinterrupt"] = ("    class A:\n        def __eq__(self, o): raise KeyboardInterrupt\n    return A()\n", {"failed"})
    c["eq_raises_baseexception"] = ("    class A:\n        def __eq__(self, o): raise BaseException('x')\n        def __repr__(self): raise BaseException('x')\n    return A()\n", {"failed"})
    c["raise_baseexception"] = ("    raise BaseException('stop')\n", {"crashed"})
    c["patch_builtins"] = ("    return None\nimport builtins, math\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
                           "builtins.isinstance = lambda *a: True\nbuiltins.abs = lambda x: 0\nmath.fabs = lambda x: 0\n"
                           "builtins.__dict__['check'] = lambda c: None\n", {"failed", "crashed"})
    c["patch_serve_loop"] = ("    return None\nimport sys, json\nm = sys.modules['__main__']\n"
                             "m.encode_plain = lambda v, d=0: 5\njson.dumps = lambda *a, **k: '[\"ready\"]'\n", {"failed", "crashed"})
    c["nonplain_returns"] = ("    import sys\n    sys.setrecursionlimit(100000)\n    l = []\n    l.append(l)\n"
                             "    return (x for x in [l, NotImplemented, 10 ** 100000])\n", {"failed"})
    c["self_referential_list"] = ("    l = []\n    l.append(l)\n    return l\n", {"failed"})
    c["huge_int"] = ("    import sys\n    sys.set_int_max_str_digits(0)\n    return 10 ** 200000\n", {"failed"})
    c["deep_nesting"] = ("    x = 5\n    for _ in range(100000):\n        x = [x]\n    return x\n", {"failed"})
    # --- killing the parent or everything
    c["kill_parent"] = (canary("""
        ok = False
        for target in (os.getppid(), 1, -1, 0):
            try:
                os.kill(target, signal.SIGKILL); ok = True
            except OSError:
                pass
        try:
            os.killpg(0, signal.SIGKILL); ok = True
        except OSError:
            pass
        libc = ctypes.CDLL(None)
        ok = ok or libc.syscall(62, -1, 9) == 0 or libc.syscall(200, 1, 9) == 0
        try:
            fd = os.pidfd_open(os.getppid()); signal.pidfd_send_signal(fd, signal.SIGKILL); ok = True
        except OSError:
            pass
        return ok"""), {"failed"})
    c["kill_self_group_top"] = ("    return a + b\nimport os, signal\nos.kill(0, signal.SIGKILL)\n", {"crashed"})
    # --- lingering threads, output floods, files
    c["lingering_threads_wrong"] = ("    import threading, time\n"
                                    "    threading.Thread(target=lambda: time.sleep(1000)).start()\n"
                                    "    threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
                                    "    return a - b\n", {"failed"})
    c["stdout_flood"] = ("    import sys\n    while True:\n        sys.stdout.write('x' * 100000)\n", {"crashed"})
    c["stderr_flood_top"] = ("    return a + b\nimport os\nwhile True:\n    os.write(2, b'y' * 65536)\n", {"crashed"})
    c["huge_file"] = ("    with open('big', 'wb') as fh:\n        fh.write(b'x' * (50 << 20))\n    return a + b\n", {"crashed", "failed", "out_of_memory"})
    c["fill_tmpfs"] = (canary("""
        for i in range(10000):
            with open(f'/tmp/f{i}', 'wb') as fh:
                fh.write(b'x' * (1 << 20))
        return True"""), {"failed"})
    c["many_fds"] = (canary("fds = [open('/dev/null') for _ in range(100000)]\nreturn True"), {"failed"})
    return c


@pytest.fixture(scope="module")
def ev(outside):
    with Evaluator(SandboxConfig(timeout_s=1.5, memory_mb=128, workers=2, output_bytes=1 << 14,
                                 file_bytes=1 << 20)) as e:
        yield e


@pytest.fixture(scope="module")
def hostile(ev, outside):
    cases = hostile_cases(outside) | {"good": (GOOD, {"passed"})}
    names = list(cases)
    results = ev.run([(ADD, cases[n][0], i) for i, n in enumerate(names)])
    return {n: (r, cases[n][1]) for n, r in zip(names, results)} | {"_all": results}


def _case_names():
    return list(hostile_cases({"new": [], "targets": [], "secrets": [], "port": 1, "udp_port": 1,
                               "unix_path": "", "abstract_name": ""}))


@pytest.mark.parametrize("name", _case_names())
def test_hostile_case_label(hostile, name):
    result, expected = hostile[name]
    assert result.label != "passed", result
    assert result.label in expected, result


def test_every_sample_labelled_and_control_passes(hostile):
    results = hostile["_all"]
    assert all(r.label in LABELS for r in results)
    assert [r.sample_index for r in results] == list(range(len(results)))
    assert hostile["good"][0].label == "passed"


def test_no_outside_effect(hostile, outside):
    for p in outside["new"]:
        assert not os.path.exists(p), p
    for p in outside["targets"]:
        with open(p) as f:
            assert f.read() == "original", p
    for p in outside["secrets"]:
        with open(p) as f:
            assert f.read() == SECRET, p
    for name in ("tcp", "unix", "abstract"):
        with pytest.raises(BlockingIOError):
            outside[name].accept()
    with pytest.raises(BlockingIOError):
        outside["udp"].recvfrom(16)


def _sandbox_processes():
    """Descendants of this process: workers, bwrap and zygotes, and anything else."""
    me = psutil.Process()
    procs = me.children(recursive=True)
    zygotes = [p for p in procs if "zygote" in _cmdline(p) and "bwrap" not in _cmdline(p)[0]]
    return procs, zygotes


def _cmdline(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _assert_only_idle_preforks(zygotes):
    """Between samples a zygote has at most one child: the next sample's pre-forked,
    still idle candidate (one thread, no CPU used). A lingering candidate would show up
    as a second child, or as a child with threads or CPU time."""
    for z in zygotes:
        kids = z.children(recursive=True)
        assert len(kids) <= 1, "a candidate process outlived its sample"
        for k in kids:
            cpu = k.cpu_times()
            assert k.num_threads() == 1 and cpu.user + cpu.system < 0.05, "a candidate outlived its sample"


def test_evaluator_survives_and_nothing_lingers(ev, hostile):
    (r,) = ev.run([(ADD, GOOD, 0)])
    assert r.label == "passed"
    procs, zygotes = _sandbox_processes()
    assert zygotes, "expected live zygotes while the evaluator is open"
    _assert_only_idle_preforks(zygotes)
    # per worker: the worker, bwrap, the zygote (PID 1 of the sandbox) and an idle pre-fork
    assert len(procs) <= 4 * 2, [(p.pid, _cmdline(p)[:3]) for p in procs]


def test_lingering_thread_with_correct_answer_passes_and_is_killed(ev):
    completion = ("    import threading, time\n"
                  "    threading.Thread(target=lambda: [0 for _ in iter(int, 1)]).start()\n"
                  "    return a + b\n")
    (r,) = ev.run([(ADD, completion, 0)])
    assert r.label == "passed"
    _, zygotes = _sandbox_processes()
    _assert_only_idle_preforks(zygotes)


def test_no_cross_sample_contamination(outside):
    """Sample 1 litters /tmp, patches modules and leaves a thread; sample 2 sees none of it."""
    litter = ("    import os, math, threading, time, sys\n"
              "    if not os.path.exists('/tmp/d'):\n"
              "        os.makedirs('/tmp/d/e'); open('/tmp/d/e/evil.py', 'w').write('x=1')\n"
              "        os.chmod('/tmp/d/e', 0); os.chmod('/tmp/d', 0)\n"
              "    open('/tmp/json.py', 'w').write('raise SystemExit')\n"
              "    math.sqrt = lambda x: 3\n"
              "    threading.Thread(target=time.sleep, args=(100,)).start()\n"
              "    return a + b\n")
    clean = canary("import math, threading, json\nreturn os.listdir('/tmp') == [] and math.sqrt(4) == 2.0 "
                   "and threading.active_count() == 1 and os.getcwd() == '/tmp'")
    with Evaluator(SandboxConfig(timeout_s=2.0, workers=1)) as e:
        results = e.run([(ADD, litter, 0), (ADD, clean, 1), (ADD, litter, 2), (ADD, clean, 3)])
    assert [r.label for r in results] == ["passed"] * 4, results


def test_close_leaves_no_process(outside):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    e = Evaluator(SandboxConfig(timeout_s=1.0, workers=2))
    cases = hostile_cases(outside)
    e.run([(ADD, cases[n][0], i) for i, n in enumerate(["fork_bomb", "thread_bomb", "sleep", "cpu_loop",
                                                          "lingering_threads_wrong", "ignore_signals"])])
    e.close()
    after = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert after == [], [(p.pid, _cmdline(p)[:3]) for p in after]


def test_mode_none_still_blocks_process_creation_and_signals(outside):
    with pytest.warns(RuntimeWarning):
        e = Evaluator(SandboxConfig(mode="none", timeout_s=1.0, workers=1))
    with e:
        cases = hostile_cases(outside)
        names = ["os_system", "os_fork", "kill_parent", "tcp_udp_connect", "cpu_loop", "memory_bomb"]
        results = e.run([(ADD, cases[n][0], i) for i, n in enumerate(names)] + [(ADD, GOOD, 9)])
        assert [r.label for r in results] == ["failed", "failed", "failed", "failed", "timeout",
                                              "out_of_memory", "passed"], results
        for p in outside["new"]:
            assert not os.path.exists(p), p
