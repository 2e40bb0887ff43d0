"""Codex-S and Codex-D training data: generated problems (train families / held-out
families) and functions mined from the code corpus, all verified in the sandbox, as
"sft" JSONL records ({"prompt", "response"}, extra fields kept as metadata) that
`experiments.sft --train_files/--eval_files` reads.

Codex-S: prompt = the problem prompt (imports, signature, docstring), response = the
canonical body. Codex-D (docstring generation, evaluated by back-translation): prompt =
the imports and signature, the body without the docstring, then DOCSTRING_REQUEST;
response = the docstring text, each line indented 4 spaces (so no Codex stop sequence
can occur in it). `backtranslation_prompt` puts a generated docstring back under the
signature, making a Codex-S prompt to sample code from.

Files written into out_dir (each atomically): problems_train.jsonl, problems_test.jsonl,
problems_new_instances.jsonl (HumanEval format; test = held-out families, new_instances =
new problems of the training families, see families.problem_splits), mined_problems.jsonl
(HumanEval format plus "split": train/eval; may be empty), codex_s_train.jsonl,
codex_s_eval.jsonl, codex_d_train.jsonl, codex_d_eval.jsonl and report.json (last). A rerun
with the same settings, corpus files and generator code reuses them.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from instructjax.codex import families, mining
from instructjax.codex.sandbox import Evaluator, Problem, SandboxConfig
from instructjax.config import ConfigError
from instructjax.data.jsonl import write_json_atomic, write_jsonl_atomic

DOCSTRING_REQUEST = "\n\n# The docstring of {name}:\n"
OUTPUTS = ("problems_train.jsonl", "problems_test.jsonl", "problems_new_instances.jsonl",
           "mined_problems.jsonl",
           "codex_s_train.jsonl", "codex_s_eval.jsonl", "codex_d_train.jsonl",
           "codex_d_eval.jsonl", "report.json")
_FORMAT_VERSION = 2  # bump when the record formats change
_SOURCES = ("families.py", "family_lists.py", "family_strings.py", "family_compose.py", "mining.py",
            "codex_data.py")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CodexDataConfig:
    out_dir: str
    seed: int = 0
    corpus_files: tuple[str, ...] = ()  # code corpus JSONL ({"text", "path"}) to mine
    per_family_train: int = 30
    per_family_test: int = 10
    test_fraction: float = 0.25         # share of families held out
    max_mined: int = 200                # 0 = do not mine
    mined_eval_fraction: float = 0.1    # share of mined problems (by task_id hash) in eval
    max_body_lines: int = 40
    max_prompt_chars: int = 2000
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)

    def __post_init__(self):
        def require(ok, message):
            if not ok:
                raise ConfigError(message)
        require(bool(self.out_dir), "--out_dir is required")
        for name in ("per_family_train", "per_family_test", "max_body_lines", "max_prompt_chars"):
            require(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        require(self.max_mined >= 0, f"--max_mined must be >= 0, got {self.max_mined}")
        require(0 < self.test_fraction < 1, f"--test_fraction must be in (0, 1), got {self.test_fraction}")
        require(0 <= self.mined_eval_fraction < 1,
                f"--mined_eval_fraction must be in [0, 1), got {self.mined_eval_fraction}")
        if self.max_mined:
            require(bool(self.corpus_files), "--corpus_files: give the code corpus JSONL files "
                    "to mine, or set --max_mined=0")
            for f in self.corpus_files:
                require(Path(f).is_file(), f"--corpus_files: {f} not found; build the corpus "
                        "with `python -m experiments.code_corpus` or set --max_mined=0")


# ----------------------------------------------------------------------------- records
def _split_prompt(problem: dict) -> tuple[str, str]:
    """(everything before the entry point's docstring, the cleaned docstring)."""
    where = f"problem {problem.get('task_id')!r}"
    try:
        tree = ast.parse(problem["prompt"])
    except SyntaxError as e:
        raise ValueError(f"{where}: the prompt does not parse ({e.msg}, line {e.lineno})") from None
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"]]
    doc = ast.get_docstring(fns[-1], clean=True) if fns else None
    if doc is None:
        raise ValueError(f"{where}: the prompt has no docstring under def {problem['entry_point']}")
    first = fns[-1].body[0]
    if first.lineno == fns[-1].lineno:
        raise ValueError(f"{where}: the docstring starts on the def line")
    head = "".join(problem["prompt"].splitlines(keepends=True)[:first.lineno - 1])
    return head, doc


def _solution(problem: dict) -> str:
    body = problem.get("canonical_solution")
    if not isinstance(body, str) or not body.strip():
        raise ValueError(f"problem {problem.get('task_id')!r} has no canonical_solution")
    return body


def codex_s_records(problems: Sequence[dict]) -> list[dict]:
    """Codex-S SFT records: problem prompt -> canonical body."""
    return [{"prompt": p["prompt"], "response": _solution(p), "task_id": p["task_id"]}
            for p in problems]


def codex_d_prompt(problem: dict) -> str:
    """Signature + body without the docstring, then the request for the docstring."""
    head, _ = _split_prompt(problem)
    return head + _solution(problem).rstrip("\n") + DOCSTRING_REQUEST.format(name=problem["entry_point"])


def docstring_response(docstring: str) -> str:
    """A docstring as Codex-D's target: cleaned, each non-blank line indented 4 spaces."""
    lines = inspect.cleandoc(docstring).splitlines()
    return "".join(("    " + line if line.strip() else "") + "\n" for line in lines)


def codex_d_records(problems: Sequence[dict]) -> list[dict]:
    """Codex-D SFT records: signature + body -> docstring."""
    return [{"prompt": codex_d_prompt(p), "response": docstring_response(_split_prompt(p)[1]),
             "task_id": p["task_id"]} for p in problems]


def backtranslation_prompt(problem: dict, docstring: str) -> str:
    """`problem`'s prompt with its docstring replaced by `docstring` (e.g. a Codex-D sample),
    quoted so the prompt stays valid Python."""
    head, _ = _split_prompt(problem)
    text = inspect.cleandoc(docstring).replace('"""', "'''")
    lines = [("    " + line if line.strip() else "") for line in text.splitlines()] or [""]
    prefix = "r" if "\\" in text else ""
    return head + f'    {prefix}"""' + lines[0].lstrip() + "".join("\n" + line for line in lines[1:]) \
        + '\n    """\n'


# ----------------------------------------------------------------------------- the build
def _fingerprint(cfg: CodexDataConfig) -> str:
    settings = dataclasses.asdict(cfg)
    settings.pop("out_dir")
    settings["sandbox"].pop("workers")  # does not change the outputs
    files = []
    for f in cfg.corpus_files if cfg.max_mined else ():
        st = os.stat(f)
        files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    here = Path(__file__).parent
    code = [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _SOURCES]
    blob = json.dumps([_FORMAT_VERSION, settings, files, code], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reusable(out: Path, fingerprint: str) -> dict | None:
    if not all((out / name).is_file() for name in OUTPUTS):
        return None
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if report.get("fingerprint") == fingerprint else None


def _verify_generated(problems: list[dict], sandbox_cfg: SandboxConfig) -> dict:
    """Every generated canonical solution must pass its own tests in the sandbox."""
    jobs = [(Problem(task_id=p["task_id"], prompt=p["prompt"], test=p["test"],
                     entry_point=p["entry_point"]), p["canonical_solution"], 0) for p in problems]
    with Evaluator(sandbox_cfg) as evaluator:
        results = evaluator.run(jobs)
    bad = [r for r in results if r.label != "passed"]
    if bad:
        raise RuntimeError(f"{len(bad)} generated problems fail their own tests in the sandbox "
                           f"(a bug in the problem families); first: {bad[0].task_id}: "
                           f"{bad[0].label}: {bad[0].error}")
    return dict(Counter(r.label for r in results))


def _in_eval(task_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def build_codex_data(cfg: CodexDataConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Writes (or reuses) everything listed in the module docstring; returns the report."""
    say = progress or (lambda message: None)
    start = time.time()
    out = Path(cfg.out_dir)
    fingerprint = _fingerprint(cfg)
    report = _reusable(out, fingerprint)
    if report is not None:
        say(f"codex data: settings unchanged, reusing {out}")
        return {**report, "reused": True}

    splits = families.problem_splits(cfg.seed, cfg.per_family_train, cfg.per_family_test,
                                     cfg.test_fraction)
    say(f"codex data: {len(splits['train'])} train / {len(splits['test'])} held-out-family / "
        f"{len(splits['new_instances'])} new-instance generated problems; checking them in "
        "the sandbox")
    verified = _verify_generated([p for split in splits.values() for p in split], cfg.sandbox)
    mined, mining_report = ([], {"kept": 0}) if not cfg.max_mined else mining.mine(
        cfg.corpus_files, cfg.sandbox, cfg.max_mined, max_body_lines=cfg.max_body_lines,
        max_prompt_chars=cfg.max_prompt_chars, progress=say)
    for p in mined:
        p["split"] = "eval" if _in_eval(p["task_id"], cfg.mined_eval_fraction) else "train"
    mined_split = {s: [p for p in mined if p["split"] == s] for s in ("train", "eval")}
    sets = {"train": splits["train"] + mined_split["train"], "eval": splits["test"] + mined_split["eval"]}

    for split, problems in splits.items():
        write_jsonl_atomic(out / f"problems_{split}.jsonl", problems)
    write_jsonl_atomic(out / "mined_problems.jsonl", mined)
    counts = {}
    for split, problems in sets.items():
        for kind, make in (("codex_s", codex_s_records), ("codex_d", codex_d_records)):
            records = make(problems)
            write_jsonl_atomic(out / f"{kind}_{split}.jsonl", records)
            counts[f"{kind}_{split}"] = len(records)
    train_families, test_families = families.split_families(cfg.seed, cfg.test_fraction)
    report = {
        "fingerprint": fingerprint,
        "settings": {**dataclasses.asdict(cfg), "corpus_files": list(cfg.corpus_files)},
        "generated": {"train_families": list(train_families), "test_families": list(test_families),
                      "train_problems": len(splits["train"]), "test_problems": len(splits["test"]),
                      "new_instance_problems": len(splits["new_instances"]),
                      "sandbox_labels": verified},
        "mining": {**mining_report, "train": len(mined_split["train"]),
                   "eval": len(mined_split["eval"])},
        "records": counts,
        "seconds": round(time.time() - start, 2),
    }
    write_json_atomic(out / "report.json", report)
    return {**report, "reused": False}


def write_codex_data(out_dir: str | Path, seed: int, corpus_files: Sequence[str | Path],
                     progress: Callable[[str], None] | None = None, **settings) -> dict:
    """build_codex_data with the settings as keywords (see CodexDataConfig for the names)."""
    cfg = CodexDataConfig(out_dir=str(out_dir), seed=seed,
                          corpus_files=tuple(str(f) for f in corpus_files), **settings)
    return build_codex_data(cfg, progress)


def format_report(report: dict) -> str:
    gen, mined = report["generated"], report["mining"]
    rows = [f"generated: {gen['train_problems']} train problems from {len(gen['train_families'])} "
            f"families, {gen['test_problems']} held-out from {gen['test_families']}, "
            f"{gen['new_instance_problems']} new problems of the training families",
            f"mined: {mined.get('candidates', 0)} functions with doctests, kept {mined['kept']} "
            f"({mined['train']} train / {mined['eval']} eval)"]
    for reason, n in mined.get("rejected", {}).items():
        rows.append(f"  rejected {reason}: {n}")
    rows.append("records: " + ", ".join(f"{k} {v}" for k, v in report["records"].items()))
    if report.get("reused"):
        rows.append("(settings and inputs unchanged: reused the earlier outputs)")
    return "\n".join(rows)
