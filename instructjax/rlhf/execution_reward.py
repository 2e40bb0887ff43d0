"""Reward from execution feedback: each sampled completion of a code problem runs against
the problem's unit tests in the sandbox (codex/sandbox.py), on the host, between the two
jitted halves of the RL iteration (rl_program.RLProgram.host_scored).

The prompt file is a problem file (HumanEval format: task_id, prompt, test, entry_point);
each rollout row carries its prompt's line in it. A completion is cut before its EOS and at
the first Codex stop sequence, and the response's token mask is cut to the tokens that spell
what ran, so the update credits exactly the code that was scored (a cut response counts as
ended). Reward: `pass_reward` when every test passed, 0 when one failed, -`error_penalty`
for a timeout, a crash or running out of memory, 0 for a sandbox error (counted).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from instructjax.codex import problems as problems_lib
from instructjax.codex.sandbox import Evaluator, Problem, SandboxConfig
from instructjax.data.jsonl import DataError, read_jsonl
from instructjax.data.tokenizer import Tokenizer
from instructjax.rlhf.generate import prefix_spelling

ERRORS = ("timeout", "crashed", "out_of_memory")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecutionRewardConfig:
    """The reward's values and the sandbox that runs the tests (codex.sandbox.SandboxConfig:
    mode bwrap or none, per-run wall-clock limit, memory cap, parallel workers, 0 = one per
    CPU)."""
    pass_reward: float = 1.0
    error_penalty: float = 0.0
    stop: tuple[str, ...] = problems_lib.STOP
    sandbox: str = "bwrap"
    timeout_s: float = 3.0
    memory_mb: int = 1024
    workers: int = 0

    def sandbox_config(self) -> SandboxConfig:
        return SandboxConfig(mode=self.sandbox, timeout_s=self.timeout_s,
                             memory_mb=self.memory_mb, workers=self.workers)


def load_problems_by_line(path: str | Path) -> dict[int, Problem]:
    """{line number: Problem} of a HumanEval-format JSONL file."""
    fields = {"task_id": str, "prompt": str, "test": str, "entry_point": str}
    out = {line: Problem(**{k: r[k] for k in fields})
           for line, r in read_jsonl(path, required=fields)}
    if not out:
        raise DataError(f"{path}: no problems")
    return out


class ExecutionReward:
    """Scores a batch of sampled responses by running them. Use as a context manager (it
    owns the sandbox's worker processes)."""

    def __init__(self, problem_file: str | Path, tokenizer: Tokenizer,
                 cfg: ExecutionRewardConfig = ExecutionRewardConfig()):
        self.problems = load_problems_by_line(problem_file)
        self.problem_file, self.tokenizer, self.cfg = problem_file, tokenizer, cfg
        self.evaluator = Evaluator(cfg.sandbox_config())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.evaluator.close()

    def score(self, prompt_line_B: np.ndarray, tokens_BxN: np.ndarray, mask_BxN: np.ndarray,
              ended_B: np.ndarray) -> dict[str, np.ndarray | dict[str, float]]:
        """Host arrays in, host arrays out: {'score_B' f32, 'mask_BxN' (cut), 'ended_B' (cut
        responses count as ended), 'metrics': {'exec/<label>': share of rows, 'exec/seconds'}}."""
        B, N = tokens_BxN.shape
        mask_out = np.zeros((B, N), np.float32)
        ended_out = np.asarray(ended_B, bool).copy()
        jobs = []
        for b in range(B):
            problem = self.problems.get(int(prompt_line_B[b]))
            if problem is None:
                raise DataError(f"{self.problem_file}: a rollout came from line "
                                f"{int(prompt_line_B[b])}, which holds no problem; the prompt "
                                "file must be the problem file")
            n = int(np.sum(mask_BxN[b] > 0))
            ids = tokens_BxN[b, :n - int(ended_out[b])].tolist()  # without the EOS
            text = self.tokenizer.decode(ids)
            kept = problems_lib.truncate(text, self.cfg.stop)
            if len(kept) < len(text):
                n, ended_out[b] = len(prefix_spelling(self.tokenizer, ids, len(kept))), True
            mask_out[b, :n] = 1.0
            jobs.append((problem, kept, b))
        start = time.perf_counter()
        results = self.evaluator.run(jobs)
        seconds = time.perf_counter() - start
        labels = [r.label for r in results]
        score = np.array([self.cfg.pass_reward if label == "passed" else
                          -self.cfg.error_penalty if label in ERRORS else 0.0
                          for label in labels], np.float32)
        metrics = {f"exec/{label}": labels.count(label) / B
                   for label in ("passed", "failed", *ERRORS, "sandbox_error")}
        metrics["exec/seconds"] = seconds
        return {"score_B": score, "mask_BxN": mask_out, "ended_B": ended_out,
                "metrics": metrics}


def given_score(reward_params, tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT):
    """A RolloutModels.score_fn for host-computed scores: they arrive as the 'reward params'."""
    del tokens_BxT, positions_BxT, segment_ids_BxT, response_mask_BxT
    return reward_params
