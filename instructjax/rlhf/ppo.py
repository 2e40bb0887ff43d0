"""PPO and PPO-ptx (InstructGPT): the train state, the one jitted PPO iteration, and the run.

One iteration = ONE jitted function (explicit shardings, donated state):

  1. rollout: sample a response to each left-padded prompt at the sampling temperature;
     recompute log-probs (policy and reference, tempered), values (value model) and the RM
     score, read as the RM was trained (its last real token, or 'pooled'; rollout.py);
  2. rewards: -beta * (log pi - log pi_ref) per token + the score at the last token (a fixed
     penalty score when no EOS was produced); GAE(gamma, lam); advantages whitened;
  3. update: `ppo_epochs` epochs, each a fresh permutation of the rollout rows split into
     `num_minibatches` minibatches, all E * M optimiser updates one `lax.scan`. The objective
     is rl_losses.ppo_loss, or rl_losses.ppo_ptx_loss with each update paired with its own
     pretraining batch (the iteration's input carries [U * ptx_batch, T] rows; update u
     reads rows u::U);
  4. the KL controller (fixed, or adaptive with target + horizon) updates beta from the
     rollout's mean sequence KL.

State layout (PPOState): `params` are the POLICY params, `value_params` the value model's,
`opt_state` the optimiser state of the trainable tree {'policy': params, 'value':
value_params} (one optax optimiser), `kl` = {'beta'}. Keeping the policy under `params` is
what makes a PPO workdir a finished LM run: `load_trained(ppo_workdir)` (and
`restore_params`, `--init_from`) read `state.params` of the latest checkpoint, i.e. the
policy, at every checkpoint of the run, killed or finished; the workdir also carries the
policy's model_config.json and tokenizer.model. The value model's config is in
value_model_config.json (`ppo_run.load_value_model`). The run itself is in ppo_run.py.

The reference and reward params are frozen, sharded by the same logical rules and passed to
the jitted iteration as ARGUMENTS (never closed-over constants).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instructjax import parallel, rl_ops
from instructjax.config import ConfigError, DataConfig, OptimConfig, TrainConfig
from instructjax.losses import LMLossConfig, Objective
from instructjax.rl_losses import (PolicyValueApply, PPOLossConfig, PPOPtxLossConfig, ppo_loss,
                                   ppo_ptx_loss)
from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer
from instructjax.rlhf import rollout as rollout_lib
from instructjax.train import state as state_lib
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
    pretraining loss on ptx_batch_size rows of ptx_seq_len tokens per update."""
    workdir: str
    policy_from: str                      # SFT workdir (head 'lm')
    reward_from: str                      # reward-model workdir (head 'scalar')
    data: DataConfig                      # data_dir, embedded-world settings
    optim: OptimConfig
    prompt_file: str = ""                 # '' = the embedded world's prompts_train.jsonl
    ptx_file: str = ""                    # '' = the embedded world's pretrain_train.jsonl
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
        require(bool(self.workdir), "--workdir must be set")
        require(bool(self.policy_from), "--policy_from (the SFT workdir) must be set")
        require(bool(self.reward_from), "--reward_from (the reward-model workdir) must be set")
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
        except ValueError as e:
            raise ConfigError(str(e)) from None

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
            no_eos_penalty=self.no_eos_penalty, whiten_advantages=self.whiten_advantages,
            vocab_limit=vocab_limit)

    def loss_config(self) -> PPOLossConfig | PPOPtxLossConfig:
        ppo = PPOLossConfig(clip_eps=self.clip_eps, value_clip=self.value_clip,
                            vf_coef=self.vf_coef, temperature=self.temperature,
                            entropy_coef=self.entropy_coef)
        return PPOPtxLossConfig(ppo=ppo, lm=LMLossConfig(), gamma_ptx=self.gamma_ptx) \
            if self.use_ptx else ppo

    def objective(self) -> Objective:
        return Objective(ppo_ptx_loss if self.use_ptx else ppo_loss, self.loss_config())

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


# ============================================================================ state

@flax.struct.dataclass
class PPOState:
    step: jax.Array
    params: Any          # the policy (head 'lm'): what load_trained(ppo_workdir) returns
    value_params: Any    # the value model (head 'scalar')
    opt_state: Any       # of {'policy': params, 'value': value_params}
    kl: Any              # {'beta': f32}

    @property
    def trainable(self) -> dict[str, Any]:
        return {"policy": self.params, "value": self.value_params}


def abstract_ppo_state(policy: Transformer, value: Transformer, tx: optax.GradientTransformation,
                       mesh: Mesh, init_kl_coef: float = 0.0):
    """(abstract PPOState of ShapeDtypeStructs carrying shardings, sharding tree)."""
    policy_init = state_lib.boxed_params_fn(policy, 2)
    value_init = state_lib.boxed_params_fn(value, 2)

    def init_boxed(rng):
        p, v = policy_init(rng), value_init(rng)
        return PPOState(step=jnp.zeros((), jnp.int32), params=p, value_params=v,
                        opt_state=tx.init({"policy": p, "value": v}),
                        kl=rl_ops.kl_controller_init(init_kl_coef))

    return state_lib.with_shardings(jax.eval_shape(init_boxed, jax.random.key(0)), mesh)


def init_ppo_state(policy_params, value_params, tx: optax.GradientTransformation,
                   state_shardings, mesh: Mesh, init_kl_coef: float) -> PPOState:
    """A fresh PPOState from (already sharded) starting params. The state is donated every
    iteration, so these buffers must not be shared with the frozen reference/reward params:
    load them separately (or copy)."""
    def init(p, v):
        return PPOState(step=jnp.zeros((), jnp.int32), params=p, value_params=v,
                        opt_state=tx.init({"policy": p, "value": v}),
                        kl=rl_ops.kl_controller_init(init_kl_coef))

    return parallel.ShardedJit(init, mesh, out_shardings=state_shardings)(policy_params,
                                                                          value_params)


def init_scalar_from_lm(lm_params, scalar_abstract, rng: jax.Array):
    """Params of a head='scalar' model from a head='lm' model's params: the shared trunk is
    copied; leaves only the scalar model has (the scalar head) are initialised fresh, kernels
    ~ N(0, 1/(d_model + 1)) (lm-human-preferences' reward head) and biases 0. The LM-only
    unembedding (an untied 'lm_head') is dropped. `scalar_abstract`: ShapeDtypeStructs with
    shardings (state.abstract_params of the scalar model); the result lands in those shards."""
    flat_lm = flax.traverse_util.flatten_dict(lm_params)
    flat_abs = flax.traverse_util.flatten_dict(scalar_abstract)

    def build(lm, key):
        out = {}
        for i, (path, leaf) in enumerate(flat_abs.items()):
            if path in lm:
                if lm[path].shape != leaf.shape:
                    raise ValueError(f"init_scalar_from_lm: {'/'.join(path)} has shape "
                                     f"{lm[path].shape}, the scalar model wants {leaf.shape}")
                out[path] = jnp.asarray(lm[path], leaf.dtype)
            elif path[-1] == "kernel":
                std = 1.0 / jnp.sqrt(leaf.shape[0] + 1.0)
                out[path] = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape,
                                                    leaf.dtype)
            else:
                out[path] = jnp.zeros(leaf.shape, leaf.dtype)
        return flax.traverse_util.unflatten_dict(out)

    shared = {path: flat_lm[path] for path in flat_abs if path in flat_lm}
    shardings = jax.tree.map(lambda s: s.sharding, scalar_abstract)
    return jax.jit(build, out_shardings=shardings)(shared, rng)


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


def make_ppo_iteration(cfg: PPOConfig, *, models: rollout_lib.RolloutModels,
                       rollout_cfg: rollout_lib.RolloutConfig, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, mesh: Mesh, state_shardings, frozen_shardings,
                       compiler_options: dict[str, Any] | None = None,
                       return_responses: bool = False):
    """(state, frozen, batch, base_rng) -> (state, metrics), one PPO iteration, jitted with
    explicit shardings and the state donated. frozen = {'reference', 'reward'} params; batch
    = a PPOInputs dict after parallel.global_batch. metrics: name -> (sum, weight).
    compiler_options go to XLA for this program (tests lower the optimisation level).
    return_responses: also return the rollout's responses, (state, metrics, responses) with
    responses = {tokens_BxN, lengths_B (incl. EOS), ended_B} sharded like the batch (for
    host-side scoring, e.g. the gold reward of the over-optimisation frontier)."""
    apply = PolicyValueApply.from_models(models.policy, models.value)

    def iteration(state: PPOState, frozen, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        beta = state.kl["beta"]
        ppo_batch, stats = rollout_lib.rollout(
            state.trainable, frozen, batch["prompt_tokens"], batch["prompt_mask"],
            jax.random.fold_in(rng, 0), beta, models=models, cfg=rollout_cfg)
        ptx = {k: batch[f"ptx_{k}"] for k in PTX_KEYS} if cfg.use_ptx else None
        params, opt_state, metrics = ppo_update(
            state.trainable, state.opt_state, ppo_batch, ptx, jax.random.fold_in(rng, 1),
            cfg=cfg, apply=apply, tx=tx, mesh=mesh)
        metrics.update(rollout_lib.rollout_metrics(stats, beta))
        one = jnp.ones((), jnp.float32)
        metrics["learning_rate"] = (jnp.asarray(schedule(state.step * cfg.num_updates),
                                                jnp.float32), one)
        metrics["param_norm"] = (optax.tree.norm(params["policy"]), one)
        metrics["tokens"] = (jnp.sum(stats["lengths_B"]), one)  # generated tokens
        kl = rl_ops.kl_controller_update(state.kl, jnp.mean(stats["kl_B"]),
                                         batch["prompt_tokens"].shape[0],
                                         target=cfg.kl_target, horizon=cfg.kl_horizon)
        new_state = PPOState(step=state.step + 1, params=params["policy"],
                             value_params=params["value"], opt_state=opt_state, kl=kl)
        if not return_responses:
            return new_state, metrics
        P = batch["prompt_tokens"].shape[1]
        responses = {"tokens_BxN": ppo_batch["tokens_BxT"][:, P:],
                     "lengths_B": stats["lengths_B"].astype(jnp.int32),
                     "ended_B": stats["ended_B"]}
        return new_state, metrics, responses

    rep, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    out_shardings = (state_shardings, rep) + ((batch_sharding,) if return_responses else ())
    return parallel.ShardedJit(
        iteration, mesh,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding, rep),
        out_shardings=out_shardings, donate_argnums=(0,),
        compiler_options=compiler_options)


def make_optimizer(cfg: PPOConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One optimiser over {'policy', 'value'}; the schedule counts optimiser updates
    (iterations * ppo_epochs * num_minibatches)."""
    total = cfg.iterations * cfg.num_updates
    return state_lib.make_optimizer(cfg.optim, total), state_lib.make_schedule(cfg.optim, total)
