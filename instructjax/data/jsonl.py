"""Validated JSONL reading (errors name the file and line) and atomic JSONL writing."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message starts with "<path>:<line>: " and says what to do."""


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


class _NotFinite(Exception):
    pass


def _reject_constant(name: str):
    raise _NotFinite(name)  # json.loads would otherwise accept NaN, Infinity and -Infinity


def read_jsonl(path: str | Path, *, required: dict[str, type]) -> Iterator[tuple[int, dict]]:
    """Yields (line_number, record) for each non-blank line; validates required fields."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    count = 0
    with open(path, "rb") as f:  # bytes, decoded per line, so errors name the right line
        for line_number, raw in enumerate(f, start=1):
            try:  # a byte order mark may start the file
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid UTF-8 ({e.reason} at byte "
                                f"{e.start + 1} of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: malformed JSON ({e.msg} at column "
                                f"{e.colno}); each line must be one JSON object") from None
            except _NotFinite as e:
                raise DataError(f"{path}:{line_number}: {e} is not valid JSON; write a finite "
                                f"number or null") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got "
                                f"{type(record).__name__}")
            for field, kind in required.items():
                if field not in record:
                    raise DataError(f"{path}:{line_number}: missing field {field!r}; every "
                                    f"record needs {sorted(required)}")
                value = record[field]
                ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    ok = True
                if not ok:
                    raise DataError(f"{path}:{line_number}: field {field!r} must be "
                                    f"{_TYPE_NAMES.get(kind, kind.__name__)}, got "
                                    f"{type(value).__name__}")
            count += 1
            yield line_number, record
    if count == 0:
        raise DataError(f"{path}: the file has no records; it must hold one JSON object per line")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator:
    """A file ("w" text, "wb" bytes) that appears at `path` only once it is complete:
    written to a temporary file in the same directory and renamed into place; removed on
    any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    with atomic_output(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_output(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
