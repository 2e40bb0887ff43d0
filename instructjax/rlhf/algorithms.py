"""The RL algorithms one iteration can run: rollout -> advantage estimator -> objective.

An algorithm is a registry entry naming its advantage estimator (rl_ops), its objective
(rl_losses) and where its KL to the reference goes:

  ppo   InstructGPT's PPO: value model, per-token reward -beta * KL + score at the end,
        GAE advantages (whitened), clipped surrogate + clipped value loss.
  grpo  GRPO (Shao et al. 2024): no value model; G responses per prompt, advantage = the
        response's score minus its group's mean over the group's std, on every token;
        the KL (k3) is a loss term with coefficient beta, not a reward.
  rloo  RLOO (Ahmadian et al. 2024): no value model; G responses per prompt, reward = score
        - beta * sequence KL, advantage = reward minus the mean reward of the other G - 1;
        the clipped surrogate (GRPO's objective with no KL term).

Adding an algorithm: an estimator in rl_ops.py (reward_B, group_size) -> advantage_B, an
objective in rl_losses.py, and one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from instructjax import rl_ops
from instructjax.rl_losses import GRPOLossConfig, PPOLossConfig, grpo_loss, ppo_loss


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """advantages: None = GAE over per-token rewards with a value model; else
    (reward_B, group_size) -> advantage_B from one outcome reward per response.
    kl_in_reward: the reward carries -beta * KL (per token for GAE, summed over the
    response otherwise); False puts beta * KL in the loss. loss_config(hp) builds the
    objective's config from the run's hyper-parameters (a ppo.PPOConfig)."""
    loss: Callable
    loss_config: Callable[[Any], Any]
    advantages: Callable | None
    kl_in_reward: bool
    min_group_size: int = 1

    @property
    def uses_value_model(self) -> bool:
        return self.advantages is None


def _ppo_config(hp) -> PPOLossConfig:
    return PPOLossConfig(clip_eps=hp.clip_eps, value_clip=hp.value_clip, vf_coef=hp.vf_coef,
                         temperature=hp.temperature, entropy_coef=hp.entropy_coef,
                         response_len=hp.max_new_tokens)


def _grpo_config(kl_coef: Callable[[Any], float]):
    def build(hp) -> GRPOLossConfig:
        return GRPOLossConfig(clip_eps=hp.clip_eps, kl_coef=kl_coef(hp),
                              temperature=hp.temperature, response_len=hp.max_new_tokens)
    return build


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(loss=ppo_loss, loss_config=_ppo_config, advantages=None,
                     kl_in_reward=True),
    "grpo": Algorithm(loss=grpo_loss, loss_config=_grpo_config(lambda hp: hp.init_kl_coef),
                      advantages=rl_ops.group_relative_advantages, kl_in_reward=False,
                      min_group_size=2),
    "rloo": Algorithm(loss=grpo_loss, loss_config=_grpo_config(lambda hp: 0.0),
                      advantages=rl_ops.leave_one_out_advantages, kl_in_reward=True,
                      min_group_size=2),
}
