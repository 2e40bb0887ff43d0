"""One line and exit status 1 for every failure a user can cause and fix (a bad file, a
wrong workdir, a full disk); a preempted run exits 143. `--traceback` shows the whole
traceback instead, for bug reports. Every entry point runs its main through `user_facing`;
a renamed flag keeps its old name as a deprecated alias (`renamed_flag`).
"""

from __future__ import annotations

import errno
import functools
import sys

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_bool("traceback", False, "On an error, raise with the full traceback instead of "
                  "printing one line.")

# OS errors a user causes and can fix: one line, not a traceback.
USER_OS_ERRORS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported when an error happens, so that JAX starts only after the flags are read.
    from instructjax.codex.sandbox_launch import SandboxUnavailableError
    from instructjax.config import ConfigError
    from instructjax.data.jsonl import DataError
    from instructjax.model.hf_layout import HFCheckpointError
    from instructjax.train.checkpoint import CheckpointError
    from instructjax.train.loop import NonFiniteLossError
    return (ConfigError, DataError, HFCheckpointError, CheckpointError, NonFiniteLossError,
            SandboxUnavailableError, FileNotFoundError)


def one_line(e: BaseException, also: tuple[type[BaseException], ...] = ()) -> str | None:
    """The `error: ...` line for an error the user can fix; None for anything else."""
    if isinstance(e, also + _user_error_types()):
        return f"error: {e}"
    if isinstance(e, OSError) and e.errno in USER_OS_ERRORS:
        return (f"error: {e.strerror}: {e.filename or 'a file of the run'} "
                f"({errno.errorcode[e.errno]}); free space, fix the permissions or choose "
                "another --workdir / --data_dir / output")
    return None


def user_facing(main=None, *, also: tuple[type[BaseException], ...] = ()):
    """Wraps an absl main: refuses stray arguments, turns user errors into one line (exit 1)
    and a stopped run into exit 143. `also`: more error types this entry point reports as
    the user's (e.g. ValueError where every ValueError comes from the input)."""
    if main is None:
        return functools.partial(user_facing, also=also)

    @functools.wraps(main)
    def wrapped(argv):
        if len(argv) > 1:
            raise SystemExit(f"error: unexpected arguments: {argv[1:]}")
        from experiments.log_filters import quiet_library_logs
        quiet_library_logs()
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 -- re-raised unless it is the user's
            if FLAGS["traceback"].value:
                raise
            from instructjax.train.workdir import EXIT_STOPPED, RunStopped
            if isinstance(e, RunStopped):
                print(f"stopped: {e}", file=sys.stderr)
                raise SystemExit(EXIT_STOPPED) from None
            line = one_line(e, also)
            if line is None:
                raise
            raise SystemExit(line) from None
    return wrapped


def renamed_flag(old: str, new: str):
    """The value of --new, or of --old, its deprecated name (with a warning)."""
    if not FLAGS[old].present:
        return FLAGS[new].value
    if FLAGS[new].present and FLAGS[new].value != FLAGS[old].value:
        raise ValueError(f"--{old} is the deprecated name of --{new}: give only --{new}")
    logging.warning("--%s is deprecated: use --%s", old, new)
    return FLAGS[old].value
