"""experiments.from_pairs: HH-RLHF pairs -> SFT, comparison and prompt files per split."""
import json

import pytest

from experiments.from_pairs import convert
from instructjax.data.comparisons import read_comparisons
from instructjax.data.jsonl import DataError, read_jsonl


def _hh(i, reply):
    return f"\n\nHuman: question {i}?\n\nAssistant:{reply}"


def test_pairs_become_the_stages_files_with_prompts_kept_in_one_split(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps({"chosen": _hh(i, f" good {i}.{j}"),
                                        "rejected": _hh(i, f" bad {i}.{j}")}) + "\n"
                            for i in range(40) for j in range(2)))
    counts = convert([str(path)], tmp_path / "out", eval_fraction=0.25)
    assert counts["train_pairs"] + counts["eval_pairs"] == 80
    assert counts["train_prompts"] + counts["eval_prompts"] == 40
    assert 0 < counts["eval_prompts"] < 20
    splits = {}
    for split in ("train", "eval"):
        comparisons = [r for _, r in read_comparisons(tmp_path / "out" / f"comparisons_{split}.jsonl")]
        sft = [r for _, r in read_jsonl(tmp_path / "out" / f"sft_{split}.jsonl",
                                        required={"prompt": str, "response": str})]
        prompts = [r["prompt"] for _, r in read_jsonl(tmp_path / "out" / f"prompts_{split}.jsonl",
                                                      required={"prompt": str})]
        assert len(comparisons) == len(sft) == counts[f"{split}_pairs"]
        assert all(s["response"].startswith(" good") and s["prompt"].endswith("Assistant:")
                   for s in sft)
        assert all(c["responses"][c["ranking"][0]].startswith(" good") for c in comparisons)
        assert len(prompts) == len(set(prompts)) == counts[f"{split}_prompts"]
        splits[split] = set(prompts)
    assert not splits["train"] & splits["eval"]


def test_a_bad_pair_names_its_line(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": _hh(0, " a"), "rejected": _hh(0, " b")}) + "\n"
                    + json.dumps({"chosen": "no assistant turn", "rejected": _hh(1, " b")}) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: field 'chosen' has no"):
        convert([str(path)], tmp_path / "out", eval_fraction=0.5)
    assert not (tmp_path / "out" / "comparisons_train.jsonl").exists()
