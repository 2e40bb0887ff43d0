"""Turns preference pairs (HH-RLHF's {"chosen", "rejected"} transcripts, or {"prompt",
"chosen", "rejected"}) into the files every stage reads, split into train and eval:

  python -m experiments.from_pairs --input=hh_train.jsonl --out_dir=runs/hh/data

  sft_{train,eval}.jsonl          {"prompt", "response"}: the chosen replies (SFT, DPO ptx)
  comparisons_{train,eval}.jsonl  {"prompt", "responses", "ranking": [0, 1]} (reward, DPO)
  prompts_{train,eval}.jsonl      {"prompt"}, each prompt once (PPO --prompt_file, sample)

A prompt and all its pairs land in the same split (by a hash of the prompt), so no eval
prompt is trained on. Every bad line is reported as file:line.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_list("input", [], "Pair JSONL file(s), comma-separated.")
flags.DEFINE_string("out_dir", None, "Directory for the converted files.")
flags.DEFINE_float("eval_fraction", 0.05, "Share of prompts held out for evaluation.")


def split_of(prompt: str, eval_fraction: float) -> str:
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if digest / 2**64 < eval_fraction else "train"


def convert(paths: list[str], out_dir: Path, eval_fraction: float) -> dict[str, int]:
    from instructjax.data.comparisons import read_comparisons, write_comparisons
    from instructjax.data.jsonl import write_jsonl_atomic
    rows = {"train": [], "eval": []}
    for path in paths:
        for _, record in read_comparisons(path):
            rows[split_of(record["prompt"], eval_fraction)].append(record)
    counts = {}
    for split, records in rows.items():
        prompts = list(dict.fromkeys(r["prompt"] for r in records))
        write_comparisons(out_dir / f"comparisons_{split}.jsonl", records)
        write_jsonl_atomic(out_dir / f"sft_{split}.jsonl",
                           ({"prompt": r["prompt"], "response": r["responses"][r["ranking"][0]]}
                            for r in records))
        write_jsonl_atomic(out_dir / f"prompts_{split}.jsonl", ({"prompt": p} for p in prompts))
        counts[f"{split}_pairs"], counts[f"{split}_prompts"] = len(records), len(prompts)
    return counts


def main(argv):
    if not FLAGS.input or not FLAGS.out_dir:
        raise SystemExit("error: --input and --out_dir are required")
    if not 0 < FLAGS.eval_fraction < 1:
        raise SystemExit(f"error: --eval_fraction must be in (0, 1), got {FLAGS.eval_fraction}")
    counts = convert(FLAGS.input, Path(FLAGS.out_dir), FLAGS.eval_fraction)
    if not counts["train_pairs"] or not counts["eval_pairs"]:
        print(f"warning: a split is empty ({counts}); change --eval_fraction", file=sys.stderr)
    print(json.dumps(counts))


if __name__ == "__main__":
    app.run(user_facing(main))
