"""Simulated demonstrators of mixed diligence, who write the SFT demonstrations.

InstructGPT's demonstrations came from some 40 contractors of varying care; if every
demonstration were exactly what labelers prefer, SFT would already be the preferred policy
and RLHF would have nothing to move it towards. Each demonstrator here writes the correct
content, but obeys a prompt's explicit constraint (constraints.py) only with its own
probability, its diligence, drawn from U[DILIGENCE_LOW, DILIGENCE_HIGH]; otherwise it
writes the plain answer. The SFT policy then imitates the mixture.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from instructjax.data.world import constraints

# U[0.3, 0.9], not U[0.2, 0.8]: the demo's SFT policy imitates the mixture imperfectly (it
# garbles or mixes up wrappers), and with demonstrators obeying 45% of the time its samples
# obeyed only 28-39%, at the low end of or below the intended 35-60%.
DILIGENCE_LOW, DILIGENCE_HIGH = 0.3, 0.9
NUM_DEMONSTRATORS = 40
# The "diligent demonstrators" of the SFT-on-the-diligent baseline (the top third).
DILIGENT_MIN = 0.7


@dataclasses.dataclass(frozen=True)
class Demonstrator:
    id: str
    diligence: float  # probability of obeying a prompt's explicit constraint


def make_demonstrators(seed: int = 0, n: int = NUM_DEMONSTRATORS, *,
                       low: float = DILIGENCE_LOW, high: float = DILIGENCE_HIGH
                       ) -> list[Demonstrator]:
    if n < 1 or not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need n >= 1 and 0 <= low <= high <= 1, got {n}, {low}, {high}")
    rng = random.Random(f"demonstrators-{seed}")
    return [Demonstrator(f"demonstrator-{i}", round(rng.uniform(low, high), 4))
            for i in range(n)]


def demonstrate(tasks: Sequence[dict], pool: Sequence[Demonstrator], *, seed: int = 0,
                split: str = "") -> list[dict]:
    """The tasks with their demonstrations rewritten by a demonstrator drawn per task:
    the gold response (which obeys its constraint) unwrapped unless the demonstrator obeys.
    Adds "demonstrator", "diligence" and, on constrained tasks, "obeyed"."""
    rng = random.Random(f"demonstrate-{seed}-{split}")
    out = []
    for task in tasks:
        who = rng.choice(list(pool))
        record = {**task, "demonstrator": who.id, "diligence": who.diligence}
        if task.get("constraint"):
            obeyed = rng.random() < who.diligence
            record["obeyed"] = obeyed
            if not obeyed:
                record["response"] = constraints.unwrap(task["constraint"], task["response"])
        out.append(record)
    return out
