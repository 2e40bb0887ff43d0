"""The RL iteration (PPO and PPO-ptx as in InstructGPT; GRPO and RLOO, algorithms.py):
its configuration and the one jitted function.

One iteration = ONE jitted function (explicit shardings, donated state):

  1. rollout: sample `group_size` responses to each left-padded prompt at the sampling
     temperature; recompute log-probs (policy and reference, tempered), values (value
     model, PPO only) and the RM score, read as the RM was trained (its last real token,
     or 'pooled'; rollout.py);
  2. rewards: -beta * (log pi - log pi_ref) per token + the score at the last token (a fixed
     penalty score when no EOS was produced); GAE(gamma, lam), advantages whitened; or, for
     value-free algorithms, one outcome reward per response and its group-relative
     advantage on each of its tokens;
  3. update: `ppo_epochs` epochs, each a fresh permutation of the rollout rows split into
     `num_minibatches` minibatches, all E * M optimiser updates one `lax.scan`. The objective
     is rl_losses.ppo_loss, or rl_losses.ppo_ptx_loss with each update paired with its own
     pretraining batch (the iteration's input carries [U * ptx_batch, T] rows; update u
     reads rows u::U);
  4. the KL controller (fixed, or adaptive with target + horizon) updates beta from the
     rollout's mean sequence KL.

State layout (rl_state.PPOState): `params` are the POLICY params, `value_params` the value model's,
`opt_state` the optimiser state of the trainable tree {'policy': params, 'value':
value_params} (one optax optimiser), `kl` = {'beta'}. Keeping the policy under `params` is
what makes a PPO workdir a finished LM run: `load_trained(ppo_workdir)` (and
`restore_params`, `--init_from`) read `state.params` of the latest checkpoint, i.e. the
policy, at every checkpoint of the run, killed or finished; the workdir also carries the
policy's model_config.json and tokenizer.model. The value model's config is in
value_model_config.json (`ppo_run.load_value_model`). The run itself is in ppo_run.py.

The reference and reward params are frozen, sharded by the same logical rules and passed to
the jitted iteration as ARGUMENTS (never closed-over constants). Rewards computed on the
host (execution feedback) split the iteration in two jitted halves around them. The
jitted program is assembled in one place, rl_program.build_rl_program; this module holds
its configuration and the update.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructjax import parallel
from instructjax.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from instructjax.losses import LMLossConfig, Objective
from instructjax.rl_losses import (GRPOLossConfig, PolicyValueApply, PPOLossConfig,
                                   PPOPtxLossConfig, ppo_ptx_loss)
from instructjax.model.config import ModelConfig
from instructjax.rlhf import rollout as rollout_lib
from instructjax.rlhf.algorithms import ALGORITHMS, Algorithm
from instructjax.rlhf.execution_reward import ExecutionRewardConfig
from instructjax.train.step import accumulate_gradients

VALUE_MODEL_CONFIG_FILE = "value_model_config.json"
PTX_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ============================================================================ configuration

@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """A PPO / PPO-ptx run. Sizes: each iteration samples `rollout_batch_size` responses
    (prompts left-padded to `max_prompt_len`, longer ones keep their last tokens) and makes
    ppo_epochs * num_minibatches optimiser updates of rollout_batch_size / num_minibatches
    rows each (each split into grad_accum_steps micro-batches). gamma_ptx > 0 adds the
    pretraining loss on ptx_batch_size rows of ptx_seq_len tokens per update. `algorithm`
    names an entry of algorithms.ALGORITHMS; each of rollout_batch_size / group_size
    prompts gets group_size responses (GRPO's and RLOO's groups)."""
    optim: OptimConfig
    # Run paths: what a run reads and writes (check_run_paths); the program never reads them.
    workdir: str = ""
    policy_from: str = ""                 # SFT workdir (head 'lm'): --init_from
    reward_from: str = ""                 # reward-model workdir (head 'scalar')
    data: DataConfig | None = None        # data_dir, embedded-world settings
    prompt_file: str = ""                 # '' = the embedded world's prompts_train.jsonl
    ptx_file: str = ""                    # '' = the embedded world's pretrain_train.jsonl
    algorithm: str = "ppo"                # a key of algorithms.ALGORITHMS
    group_size: int = 1                   # responses per prompt
    reward: str = "model"                 # model (--reward_from) or execution (the tests)
    execution: ExecutionRewardConfig = dataclasses.field(default_factory=ExecutionRewardConfig)
    mesh: str = "data:1,fsdp:-1,tensor:1"
    iterations: int = 100
    rollout_batch_size: int = 32
    max_prompt_len: int = 64
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 4
    num_minibatches: int = 4
    grad_accum_steps: int = 1
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    init_kl_coef: float = 0.02
    kl_target: float | None = None        # None = fixed beta
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    no_eos_penalty: float | None = -1.0
    reference_logprob_coef: float = 0.0   # see rollout.RolloutConfig
    whiten_advantages: bool = True
    gamma_ptx: float = 0.0                # 0 = plain PPO
    ptx_batch_size: int = 8
    ptx_seq_len: int = 128
    compute_dtype: str = ""               # '' = each model's own
    remat: bool = False
    seed: int = 0
    log_every: int = 5
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    allow_config_change: bool = False  # see TrainConfig

    def __post_init__(self):
        def require(ok, message):
            if not ok:
                raise ConfigError(message)
        require(self.algorithm in ALGORITHMS, f"--algorithm must be one of "
                f"{', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        require(self.group_size >= self.algo.min_group_size,
                f"--algorithm={self.algorithm} needs --group_size >= "
                f"{self.algo.min_group_size}, got {self.group_size}")
        require(self.rollout_batch_size % self.group_size == 0,
                f"--rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"--group_size ({self.group_size})")
        require(self.algo.kl_in_reward or self.kl_target is None,
                f"--algorithm={self.algorithm} keeps beta (--init_kl_coef) fixed in its loss; "
                "leave --kl_target empty")
        require(self.reward in ("model", "execution"),
                f"--reward must be model or execution, got {self.reward!r}")
        if self.reward == "execution":
            require(not self.reward_from and bool(self.prompt_file) and not
                    self.algo.uses_value_model, "--reward=execution scores the tests of the "
                    "problems in --prompt_file (HumanEval format), without --reward_from and "
                    "with a value-free --algorithm (grpo or rloo)")
        for name in ("iterations", "rollout_batch_size", "max_prompt_len", "max_new_tokens",
                     "ppo_epochs", "num_minibatches", "grad_accum_steps", "ptx_batch_size",
                     "log_every", "checkpoint_every", "keep_checkpoints"):
            require(getattr(self, name) > 0, f"--{name} must be > 0, got {getattr(self, name)}")
        require(self.rollout_batch_size % self.num_minibatches == 0,
                f"--rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"--num_minibatches ({self.num_minibatches})")
        require(self.minibatch_size % self.grad_accum_steps == 0,
                f"the minibatch ({self.minibatch_size} rows) must be a multiple of "
                f"--grad_accum_steps ({self.grad_accum_steps})")
        require(self.temperature > 0, "--temperature must be > 0 for PPO (the policy's "
                "tempered distribution is what is optimised), got {self.temperature}")
        require(self.kl_target is None or self.kl_target > 0,
                f"--kl_target must be > 0 (empty = fixed beta), got {self.kl_target}")
        require(self.kl_horizon > 0, f"--kl_horizon must be > 0, got {self.kl_horizon}")
        require(self.init_kl_coef >= 0, f"--init_kl_coef must be >= 0, got {self.init_kl_coef}")
        require(self.ptx_seq_len > 1, f"--ptx_seq_len must be > 1, got {self.ptx_seq_len}")
        require(self.compute_dtype in ("", "float32", "bfloat16", "float16"),
                f"--compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        try:
            self.rollout_config(eos_id=1, pad_id=0)
            self.loss_config()
            self.execution.sandbox_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check_run_paths(self) -> None:
        """A run needs its workdir, the policy it starts from and (model rewards) the
        reward model; plans, benchmarks and tests build the program without them."""
        for ok, message in ((self.workdir, "--workdir must be set"),
                            (self.policy_from, "--init_from (the SFT workdir) must be set"),
                            (self.reward != "model" or self.reward_from,
                             "--reward_from (the reward-model workdir) must be set")):
            if not ok:
                raise ConfigError(message)

    @property
    def algo(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    @property
    def prompts_per_iteration(self) -> int:
        return self.rollout_batch_size // self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return self.ppo_epochs * self.num_minibatches

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    @property
    def use_ptx(self) -> bool:
        return self.gamma_ptx > 0

    def rollout_config(self, *, eos_id: int, pad_id: int,
                       vocab_limit: int = 0) -> rollout_lib.RolloutConfig:
        return rollout_lib.RolloutConfig(
            max_new_tokens=self.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            temperature=self.temperature, top_p=self.top_p, gamma=self.gamma, lam=self.lam,
            no_eos_penalty=self.no_eos_penalty,
            reference_logprob_coef=self.reference_logprob_coef,
            whiten_advantages=self.whiten_advantages,
            vocab_limit=vocab_limit, advantages=self.algo.advantages,
            group_size=self.group_size, kl_in_reward=self.algo.kl_in_reward)

    def loss_config(self) -> PPOLossConfig | GRPOLossConfig | PPOPtxLossConfig:
        rl = self.algo.loss_config(self)
        return PPOPtxLossConfig(ppo=rl, lm=LMLossConfig(), gamma_ptx=self.gamma_ptx) \
            if self.use_ptx else rl

    def objective(self) -> Objective:
        return Objective(ppo_ptx_loss if self.use_ptx else self.algo.loss, self.loss_config())

    def loop_config(self) -> TrainConfig:
        """The generic loop's view: one loop step = one PPO iteration."""
        return TrainConfig(steps=self.iterations, batch_size=self.rollout_batch_size,
                           seq_len=self.seq_len, seed=self.seed, log_every=self.log_every,
                           eval_every=self.iterations, eval_batches=0,
                           checkpoint_every=self.checkpoint_every,
                           keep_checkpoints=self.keep_checkpoints)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def rl_model_config(cfg: ModelConfig, *, compute_dtype: str = "", remat: bool = False
                    ) -> ModelConfig:
    """A loaded model's config for RL: dropout off; optional compute dtype / remat."""
    return dataclasses.replace(cfg, dropout_rate=0.0, remat=remat or cfg.remat,
                               compute_dtype=compute_dtype or cfg.compute_dtype)


# ============================================================================ the iteration

def split_ptx(flat_UBxT: jax.Array, num_updates: int) -> jax.Array:
    """[U * Bp, ...] -> [U, Bp, ...] with update u taking rows u::U, so every update's
    pretraining batch spans all data shards (a contiguous split would not)."""
    x = flat_UBxT.reshape(flat_UBxT.shape[0] // num_updates, num_updates, *flat_UBxT.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def minibatch_indices(rng: jax.Array, batch_size: int, epochs: int, num_minibatches: int
                      ) -> jax.Array:
    """[epochs * M, B / M] row indices: epoch e is jax.random.permutation(fold_in(rng, e), B)
    cut into M minibatches. Every row is used exactly once per epoch."""
    perms = [jax.random.permutation(jax.random.fold_in(rng, e), batch_size)
             for e in range(epochs)]
    return jnp.stack(perms).reshape(epochs * num_minibatches, batch_size // num_minibatches)


def _rows_per_update(tree, mesh: Mesh):
    """[U, rows, ...] arrays with the rows sharded over the data axes (where they divide)."""
    dp = parallel.data_parallel_size(mesh)
    sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding)
                        if x.shape[1] % dp == 0 else x, tree)


def ppo_update(params, opt_state, ppo_batch, ptx_batch, rng, *, cfg: PPOConfig,
               apply: PolicyValueApply, tx: optax.GradientTransformation, mesh: Mesh):
    """The learner half of an iteration: ppo_epochs x num_minibatches optimiser updates as
    one lax.scan. params {'policy', 'value'}; ppo_batch [B, T] arrays from the rollout;
    ptx_batch None or {key: [U * ptx_batch, T_ptx]} (update u reads rows u::U). Each epoch is
    a fresh permutation of the rows (from `rng`). Returns (params, opt_state, metrics) with
    metric pairs summed over the updates (pooled over all response tokens)."""
    objective = cfg.objective()
    U, E, M = cfg.num_updates, cfg.ppo_epochs, cfg.num_minibatches
    B = ppo_batch["tokens_BxT"].shape[0]
    # All minibatches of all epochs gathered once, before the scan: [U, B / M, ...].
    index_UxR = minibatch_indices(jax.random.fold_in(rng, 0), B, E, M)
    xs = {"rollout": _rows_per_update(jax.tree.map(lambda a: a[index_UxR], ppo_batch), mesh),
          "update": jnp.arange(U)}
    if cfg.use_ptx:
        xs["ptx"] = _rows_per_update({k: split_ptx(v, U) for k, v in ptx_batch.items()}, mesh)
    grad_rng = jax.random.fold_in(rng, 1)

    def update(carry, x):
        params, opt_state = carry
        mb = {"rollout": x["rollout"], "ptx": x["ptx"]} if cfg.use_ptx else x["rollout"]
        grads, metrics = accumulate_gradients(objective, apply, params, mb,
                                              jax.random.fold_in(grad_rng, x["update"]),
                                              cfg.grad_accum_steps)
        denominator = jnp.maximum(metrics["loss"][1], 1e-9)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        metrics = dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.ones((), jnp.float32)))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), metrics_U = jax.lax.scan(update, (params, opt_state), xs)
    metrics = {k: (jnp.sum(s), jnp.sum(w)) for k, (s, w) in metrics_U.items()}
    return params, opt_state, metrics
