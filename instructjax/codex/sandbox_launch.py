"""How a sandbox starts: the bubblewrap command line, the interpreter it runs, the seccomp
filter every candidate loads, and the check that bubblewrap works on this machine.
sandbox.py (its module docstring has the whole design) builds its workers from these."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

CHILD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
INSTALL_HELP = (
    "bubblewrap (`bwrap`) is required to run untrusted code. Install it with "
    "`apt-get install bubblewrap` (Debian/Ubuntu), `dnf install bubblewrap` (Fedora) or "
    "`pacman -S bubblewrap` (Arch). To run WITHOUT isolation (unsafe, not recommended), "
    "pass SandboxConfig(mode='none')."
)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing or does not work here."""


def sandbox_python() -> tuple[str, str]:
    """The base interpreter (a venv's site-packages are not visible inside) and its prefix."""
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def bwrap_argv(bwrap: str, file_bytes: int) -> list[str]:
    python, prefix = sandbox_python()
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    if not python.startswith(("/usr/", prefix + "/")):
        argv += ["--ro-bind", python, python]
    tmp_size = 4 * file_bytes + (4 << 20)
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(tmp_size), "--tmpfs", "/tmp", "--remount-ro", "/",
             "--chdir", "/tmp", "--clearenv", "--setenv", "PYTHONHASHSEED", "0",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--"]
    return argv


def python_argv(source_args: list[str]) -> list[str]:
    return [sandbox_python()[0], "-s", "-S", "-P"] + source_args


@functools.lru_cache(maxsize=1)
def child_source() -> str:
    with open(CHILD_FILE) as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def seccomp_bpf() -> bytes:
    """The candidate's seccomp filter as a raw BPF program (b"" if libseccomp is absent)."""
    try:
        import pyseccomp as sc
    except Exception as e:  # ImportError, or libseccomp.so missing
        warnings.warn(f"pyseccomp/libseccomp unavailable ({e}); candidates run without a "
                      "seccomp filter (namespaces, rlimits and the pids cgroup still apply)")
        return b""
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)
    deny = """fork vfork execve execveat ptrace process_vm_readv process_vm_writev kcmp
        kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo pidfd_open pidfd_send_signal
        pidfd_getfd mount umount2 pivot_root chroot unshare setns move_mount open_tree
        fsopen fsmount fsconfig fspick mount_setattr reboot swapon swapoff init_module
        finit_module delete_module kexec_load kexec_file_load bpf perf_event_open
        userfaultfd keyctl add_key request_key io_uring_setup io_uring_enter
        io_uring_register personality acct quotactl syslog ioperm iopl modify_ldt
        open_by_handle_at name_to_handle_at sethostname setdomainname settimeofday
        clock_settime clock_adjtime adjtimex fanotify_init lookup_dcookie vhangup
        mknod mknodat""".split()
    for name in deny:
        try:
            f.add_rule(eperm, name)
        except Exception:  # syscall absent on this architecture
            pass
    clone_thread, tiocsti, tioclinux = 0x00010000, 0x5412, 0x541C
    f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, clone_thread, 0))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(eperm, "socket", sc.Arg(0, sc.NE, 1))  # AF_UNIX only
    f.add_rule(eperm, "prctl", sc.Arg(0, sc.EQ, 1))  # keep PR_SET_PDEATHSIG
    for req in (tiocsti, tioclinux):
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, req))
    with tempfile.TemporaryFile() as fh:
        f.export_bpf(fh)
        fh.seek(0)
        return fh.read()


def check_sandbox() -> None:
    """Raise SandboxUnavailableError (with install instructions) unless bwrap works here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError(f"`bwrap` was not found on PATH. {INSTALL_HELP}")
    argv = bwrap_argv(bwrap, 1 << 20) + python_argv(["-c", "print('sandbox-ok')"])
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailableError(f"bwrap ({bwrap}) failed to run: {e}. {INSTALL_HELP}") from e
    if proc.returncode != 0 or proc.stdout.strip() != b"sandbox-ok":
        err = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise SandboxUnavailableError(
            f"bwrap ({bwrap}) failed a smoke run (exit {proc.returncode}): {err}. It needs "
            "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            f"user.max_user_namespaces > 0). {INSTALL_HELP}")
