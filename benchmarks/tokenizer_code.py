"""Token counts on held-out code: a tokenizer with whitespace-run symbols against one without.

  python -m benchmarks.tokenizer_code                         # the standard library's code
  python -m benchmarks.tokenizer_code --vocab_sizes=2048 \\
      --train_files=runs/code_corpus/code_train.jsonl \\
      --eval_files=runs/code_corpus/code_validation.jsonl

For each vocabulary size, trains two sentencepiece BPE models on the same training code
(instructjax.data.tokenizer.train_tokenizer, whitespace_runs False / True), encodes every
held-out file with both and reports the total tokens, the reduction and characters per
token. Every held-out file must round-trip exactly (decode(encode(x)) == x) through both
models; any failure is listed and the script exits non-zero.

Default data: the Python files of the standard library (sysconfig's "stdlib" path, without
site-packages), split into train / held-out by a hash of each file's relative path, so
the split is the same on every run and machine with the same Python.
"""

from __future__ import annotations

import hashlib
import sysconfig
import tempfile
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


def _path_bucket(relative: str) -> int:
    return int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) % 100


def stdlib_split(eval_percent: int) -> tuple[list[str], list[str], int]:
    """(train texts, held-out texts, files skipped as not UTF-8). Training files come in
    hash order, so a capped number of training lines still samples the whole library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.relative_to(root).parts and p.is_file())
    if not files:
        raise SystemExit(f"error: no Python files under {root}; pass --train_files/--eval_files")
    train, held_out, skipped = [], [], 0
    def hash_order(path):
        return hashlib.sha256(str(path.relative_to(root)).encode()).digest()

    for path in sorted(files, key=hash_order):
        try:  # newline="" keeps CRLF and lone CR exactly as in the file
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except UnicodeDecodeError:  # a few test files are deliberately in other encodings
            skipped += 1
            continue
        bucket = _path_bucket(str(path.relative_to(root)))
        (held_out if bucket < eval_percent else train).append(text)
    return train, held_out, skipped


def jsonl_texts(files: list[str]) -> list[str]:
    from instructjax.data.jsonl import read_jsonl
    return [record["text"] for path in files
            for _, record in read_jsonl(path, required={"text": str})]


def compare(train: list[str], held_out: list[str], vocab_size: int, workdir: Path,
            max_train_lines: int) -> dict:
    from instructjax.data.tokenizer import train_tokenizer
    result = {"vocab_size": vocab_size, "chars": sum(map(len, held_out))}
    for name, runs in (("plain", False), ("whitespace", True)):
        start = time.perf_counter()
        tok = train_tokenizer(train, workdir / f"{name}-{vocab_size}.model",
                              vocab_size=vocab_size, whitespace_runs=runs,
                              max_lines=max_train_lines)
        trained = time.perf_counter() - start
        total, failures = 0, []
        for i, text in enumerate(held_out):
            ids = tok.encode(text)
            total += len(ids)
            if tok.decode(ids) != text:
                failures.append(i)
        result[name] = {"tokens": total, "chars_per_token": result["chars"] / max(total, 1),
                        "round_trip_failures": len(failures), "failed_files": failures[:10],
                        "train_seconds": round(trained, 1), "pieces": tok.vocab_size}
    result["reduction_percent"] = 100.0 * (1 - result["whitespace"]["tokens"] /
                                           result["plain"]["tokens"])
    return result


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments: {argv[1:]}")
    if bool(FLAGS.train_files) != bool(FLAGS.eval_files):
        raise SystemExit("error: --train_files and --eval_files go together")
    try:
        vocab_sizes = [int(v) for v in FLAGS.vocab_sizes]
    except ValueError:
        raise SystemExit(f"error: --vocab_sizes={','.join(FLAGS.vocab_sizes)}: "
                         "expected integers") from None
    if FLAGS.train_files:
        from instructjax.data.jsonl import DataError
        try:
            train, held_out = jsonl_texts(FLAGS.train_files), jsonl_texts(FLAGS.eval_files)
        except DataError as e:
            raise SystemExit(f"error: {e}") from None
        source = f"{','.join(FLAGS.train_files)} / {','.join(FLAGS.eval_files)}"
    else:
        if not 0 < FLAGS.eval_percent < 100:
            raise SystemExit(f"error: --eval_percent must be in (0, 100), got {FLAGS.eval_percent}")
        train, held_out, skipped = stdlib_split(FLAGS.eval_percent)
        source = f"stdlib {sysconfig.get_paths()['stdlib']} ({skipped} non-UTF-8 files skipped)"
    print(f"data: {source}\n  train {len(train)} files, {sum(map(len, train)) / 1e6:.1f}M chars;"
          f" held out {len(held_out)} files, {sum(map(len, held_out)) / 1e6:.1f}M chars")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(FLAGS.workdir or tmp)
        results = [compare(train, held_out, v, workdir, FLAGS.max_train_lines) for v in vocab_sizes]

    print(f"\n{'vocab':>6} {'tokens (plain)':>15} {'tokens (ws)':>12} {'reduction':>10} "
          f"{'chars/tok plain':>16} {'chars/tok ws':>13} {'round-trip failures':>20}")
    for r in results:
        p, w = r["plain"], r["whitespace"]
        failures = p["round_trip_failures"] + w["round_trip_failures"]
        print(f"{r['vocab_size']:>6} {p['tokens']:>15,} {w['tokens']:>12,} "
              f"{r['reduction_percent']:>9.1f}% {p['chars_per_token']:>16.2f} "
              f"{w['chars_per_token']:>13.2f} {failures:>20}")
    if FLAGS.output:
        from instructjax.data.jsonl import write_json_atomic
        write_json_atomic(FLAGS.output, {"data": source, "train_files": len(train),
                                         "held_out_files": len(held_out), "results": results})
    failed = [(r["vocab_size"], name, r[name]["failed_files"]) for r in results
              for name in ("plain", "whitespace") if r[name]["round_trip_failures"]]
    if failed:
        raise SystemExit(f"error: round trip failed for held-out files (vocab, model, first "
                         f"indices): {failed}")


if __name__ == "__main__":
    # Flags only when run as a script: tests import compare() next to other flag owners.
    flags.DEFINE_list("vocab_sizes", ["2048", "8192"], "Vocabulary sizes to compare at.")
    flags.DEFINE_list("train_files", [], "Training JSONL with a 'text' field (default: stdlib code).")
    flags.DEFINE_list("eval_files", [], "Held-out JSONL with a 'text' field (with --train_files).")
    flags.DEFINE_integer("eval_percent", 10, "Stdlib split: percent of files held out (by path hash).")
    flags.DEFINE_integer("max_train_lines", 300_000, "Lines the tokenizer trains on.")
    flags.DEFINE_string("output", "", "Also write the results as JSON here (atomically).")
    flags.DEFINE_string("workdir", "", "Where the models are written (default: a temp dir).")
    app.run(main)
