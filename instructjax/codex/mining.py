"""Codex-S data mined from a code corpus: standalone top-level functions with doctests,
turned into HumanEval-format problems and kept only if their own body passes the tests
built from their doctests IN THE SANDBOX (and an empty body does not).

A function is a candidate when it is a top-level `def` whose docstring holds doctest
examples. Decorators are left out of the prompt (the sandbox checks the bare function).
It is dropped (the report counts each reason) when it is a generator or coroutine,
looks like a method (first parameter self/cls), uses global/nonlocal, uses a name that
is neither a parameter, a local, a builtin nor a module-level stdlib import (helpers,
constants, classes of its module), imports a non-stdlib module, has a body over
`max_body_lines` or a prompt over `max_prompt_chars`, has a line in its body that a Codex
stop sequence would cut, has no usable example, or repeats an earlier function.

An example is usable when its source is one call `name(<literals>)` and its expected
output is a literal (or nothing: the call returns None); only plain data, so the sandbox
can pass it. The test is `def check(candidate)` with one `assert candidate(...) == ...`
per usable example: the trusted side of the sandbox runs the test, so nothing from the
corpus but literals ever runs outside the sandbox (besides the carried stdlib imports).
"""

from __future__ import annotations

import ast
import builtins
import collections
import doctest
import hashlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from instructjax.codex.problems import truncate
from instructjax.codex.sandbox import Evaluator, Problem, SandboxConfig
from instructjax.data.jsonl import read_jsonl

_BUILTINS = frozenset(dir(builtins))
# Stdlib modules whose import does something (opens a browser, prints): the trusted side
# of the sandbox runs the prompt's imports too.
_IMPORT_DENYLIST = frozenset({"antigravity", "this", "__hello__", "__phello__", "idlelib",
                              "tkinter", "turtle", "turtledemo"})
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
_MAX_TEST_CHARS = 4000
_ROOT_PREFIX = re.compile(r"^(?:.*/)?(?:stdlib|purelib|platlib|site-packages|dist-packages)/")


class _Reject(Exception):
    """A candidate function is not usable; the message is the report's reason."""


def _is_plain(value) -> bool:
    """Data the sandbox's wire format carries exactly (no complex, no Ellipsis)."""
    if isinstance(value, _PLAIN_SCALARS):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _stdlib_root(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names and top not in _IMPORT_DENYLIST


def _module_imports(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Top-level import bindings: name -> (the statement that binds it, module or None if
    relative)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out[alias.asname] = (f"import {alias.name} as {alias.asname}", alias.name)
                else:
                    top = alias.name.split(".")[0]
                    out[top] = (f"import {alias.name}", alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = node.module if node.level == 0 else None
            for alias in node.names:
                if alias.name == "*":
                    continue
                bound = alias.asname or alias.name
                text = f"from {'.' * node.level}{node.module or ''} import {alias.name}"
                out[bound] = (text + (f" as {alias.asname}" if alias.asname else ""), module)
    return out


def _walk_undecorated(fn: ast.FunctionDef):
    """Every node of the function except its decorators (which are left out of the prompt)."""
    for part in (fn.args, fn.returns, *fn.body):
        if part is not None:
            yield from ast.walk(part)


def _bound_and_loaded(fn: ast.FunctionDef) -> tuple[set[str], set[str]]:
    """Names the function (or anything nested in it) binds, and names it reads. A flat
    approximation of Python's scoping: the sandbox verdict catches what it misses."""
    bound, loaded = set(), set()
    for node in _walk_undecorated(fn):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
    return bound, loaded


def _check_standalone(fn: ast.FunctionDef, imports: dict) -> list[str]:
    """The import statements the function needs; raises _Reject if it is not standalone."""
    params = fn.args.posonlyargs + fn.args.args
    if params and params[0].arg in ("self", "cls"):
        raise _Reject("method_like")
    for node in _walk_undecorated(fn):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)):
            raise _Reject("generator")
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            raise _Reject("global_statement")
        if isinstance(node, ast.Import):
            if not all(_stdlib_root(a.name) for a in node.names):
                raise _Reject("non_stdlib_import")
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module or not _stdlib_root(node.module):
                raise _Reject("non_stdlib_import")
    bound, loaded = _bound_and_loaded(fn)
    needed = []
    for name in sorted(loaded - bound - _BUILTINS):
        if name not in imports:
            raise _Reject("module_level_reference")
        statement, module = imports[name]
        if module is None or not _stdlib_root(module):
            raise _Reject("non_stdlib_import")
        needed.append(statement)
    return sorted(set(needed))


def _example_assert(example: doctest.Example, name: str) -> str | None:
    """`assert candidate(...) == expected` for a usable example, else None."""
    if example.exc_msg is not None or example.options:
        return None
    try:
        call = ast.parse(example.source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == name):
        return None
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        want = example.want.strip()
        expected = ast.literal_eval(want) if want else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None  # starred args, **kwargs, non-literal arguments or output
    if None in kwargs or not _is_plain([args, list(kwargs.values()), expected]):
        return None
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    op = "is" if expected is None else "=="
    return f"    assert candidate({', '.join(parts)}) {op} {expected!r}\n"


def _task_path(path: str) -> str:
    return _ROOT_PREFIX.sub("", path).removesuffix(".py").replace("\\", "/")


def _problem_from_function(fn, lines, imports, path, *, max_body_lines, max_prompt_chars):
    needed = _check_standalone(fn, imports)
    doc = fn.body[0]
    if len(fn.body) < 2:
        raise _Reject("no_body")
    if doc.lineno == fn.lineno or fn.body[1].lineno <= doc.end_lineno:
        raise _Reject("docstring_shares_line")
    if fn.end_lineno - doc.end_lineno > max_body_lines:
        raise _Reject("body_too_long")
    header = "".join(line + "\n" for line in lines[fn.lineno - 1:doc.end_lineno])
    body = "".join(line + "\n" for line in lines[doc.end_lineno:fn.end_lineno])
    prompt = ("\n".join(needed) + "\n\n\n" if needed else "") + header
    if len(prompt) > max_prompt_chars:
        raise _Reject("prompt_too_long")
    if truncate("\n" + body) != "\n" + body:  # the prompt ends in a newline
        raise _Reject("stop_sequence_in_body")
    examples = doctest.DocTestParser().get_examples(ast.get_docstring(fn, clean=True))
    asserts = [a for a in (_example_assert(e, fn.name) for e in examples) if a]
    if not asserts:
        raise _Reject("no_usable_example")
    test = "def check(candidate):\n" + "".join(asserts)
    if len(test) > _MAX_TEST_CHARS:
        raise _Reject("test_too_long")
    return {"task_id": f"Mined/{_task_path(path)}/{fn.name}", "prompt": prompt,
            "canonical_solution": body, "test": test, "entry_point": fn.name,
            "source_path": path, "source_line": fn.lineno}


def extract_candidates(text: str, path: str, *, max_body_lines: int = 40,
                       max_prompt_chars: int = 2000) -> tuple[list[dict], collections.Counter]:
    """Problems from one source file's top-level functions with doctests, before any
    sandbox run, and a Counter of why the other such functions were dropped."""
    reasons: collections.Counter = collections.Counter()
    if ">>>" not in text:
        return [], reasons
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        reasons["file_does_not_parse"] += 1
        return [], reasons
    imports = _module_imports(tree)
    lines = text.splitlines()
    out = []
    for fn in tree.body:
        if isinstance(fn, ast.AsyncFunctionDef):
            fn_doc = ast.get_docstring(fn, clean=True) or ""
            if ">>>" in fn_doc:
                reasons["generator"] += 1
            continue
        if not isinstance(fn, ast.FunctionDef):
            continue
        docstring = ast.get_docstring(fn, clean=True)
        if not docstring or not doctest.DocTestParser().get_examples(docstring):
            continue
        try:
            out.append(_problem_from_function(fn, lines, imports, path,
                                              max_body_lines=max_body_lines,
                                              max_prompt_chars=max_prompt_chars))
        except _Reject as e:
            reasons[str(e)] += 1
    return out, reasons


def _corpus_records(files: Sequence[Path]):
    for file in files:
        for line, record in read_jsonl(file, required={"text": str}):
            yield record["text"], str(record.get("path") or f"{file}:{line}")


def mine(corpus_files: Sequence[str | Path], evaluator_cfg: SandboxConfig, max_functions: int,
         *, max_body_lines: int = 40, max_prompt_chars: int = 2000,
         progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """(problems, report): at most `max_functions` sandbox-verified problems, in corpus order.

    Report: files read, candidates (top-level functions with doctests), rejected (reason ->
    count; sandbox verdicts as "sandbox_<label>"), sandbox_checked, kept, seconds.
    """
    if max_functions < 0:
        raise ValueError(f"max_functions must be >= 0, got {max_functions}")
    start = time.time()
    reasons: collections.Counter = collections.Counter()
    candidates, seen, files = [], set(), 0
    for text, path in _corpus_records([Path(f) for f in corpus_files]):
        files += 1
        found, why = extract_candidates(text, path, max_body_lines=max_body_lines,
                                        max_prompt_chars=max_prompt_chars)
        reasons.update(why)
        for problem in found:
            key = hashlib.sha256((problem["prompt"] + problem["canonical_solution"]).encode()).digest()
            if key in seen:
                reasons["duplicate"] += 1
                continue
            seen.add(key)
            candidates.append(problem)
    n_static = len(candidates) + sum(reasons.values()) - reasons["file_does_not_parse"]
    if progress:
        progress(f"mining: {files} files, {n_static} functions with doctests, "
                 f"{len(candidates)} pass the static checks")
    used_ids: collections.Counter = collections.Counter()
    for problem in candidates:  # task ids unique even for same-named functions in a module
        used_ids[problem["task_id"]] += 1
        if used_ids[problem["task_id"]] > 1:
            problem["task_id"] += f"#{used_ids[problem['task_id']]}"
    kept, checked = [], 0
    if candidates and max_functions:
        with Evaluator(evaluator_cfg) as evaluator:
            position = 0
            while position < len(candidates) and len(kept) < max_functions:
                # Over-ask a little: most candidates that reach the sandbox pass.
                batch = candidates[position:position + max(16, 2 * (max_functions - len(kept)))]
                position += len(batch)
                checked += len(batch)
                kept += _verify(evaluator, batch, reasons)[:max_functions - len(kept)]
    report = {"files": files, "candidates": n_static,
              "passed_static_checks": len(candidates), "sandbox_checked": checked,
              "kept": len(kept), "rejected": dict(sorted(reasons.items())),
              "seconds": round(time.time() - start, 2)}
    if progress:
        progress(f"mining: kept {len(kept)} of {checked} checked in the sandbox")
    return kept, report


def _verify(evaluator: Evaluator, problems: list[dict], reasons: collections.Counter) -> list[dict]:
    """The problems whose body passes their tests and whose empty body does not."""
    jobs = []
    for p in problems:
        sandboxed = Problem(task_id=p["task_id"], prompt=p["prompt"], test=p["test"],
                            entry_point=p["entry_point"])
        jobs += [(sandboxed, p["canonical_solution"], 0), (sandboxed, "    pass\n", 1)]
    results = evaluator.run(jobs)
    kept = []
    for i, p in enumerate(problems):
        own, empty = results[2 * i], results[2 * i + 1]
        if own.label != "passed":
            reasons[f"sandbox_{own.label}"] += 1
        elif empty.label == "passed":
            reasons["tests_pass_empty_body"] += 1
        else:
            kept.append(p)
    return kept
