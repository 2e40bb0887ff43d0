"""RL against a reward model, starting from an SFT policy: PPO / PPO-ptx (InstructGPT
step 3), GRPO or RLOO (--algorithm; instructjax/rlhf/algorithms.py), each with the
pretraining mix when --gamma_ptx > 0.

  python -m experiments.rl --flagfile=experiments/configs/demo_ppo.flags \
      --init_from=runs/demo/sft --reward_from=runs/demo/reward --workdir=runs/demo/ppo
  python -m experiments.rl --flagfile=experiments/configs/demo_grpo.flags \
      --init_from=runs/demo/sft --reward_from=runs/demo/reward --workdir=runs/demo/grpo

`python -m experiments.ppo` is the same program (its defaults are PPO's).

Shared flags (mesh, optimiser, cadence, data, multi-process) are those of the LM experiments
(experiments/common.py); the models come from --init_from (the SFT policy; --policy_from is
its deprecated name) and --reward_from, so the flags that choose or size a model or an LM
batch are rejected here. An RL workdir is a finished
LM run for later stages: load_trained(workdir) gives the policy.
"""

from __future__ import annotations


from absl import app, flags

from experiments import common
from experiments.errors import renamed_flag

FLAGS = flags.FLAGS

flags.DEFINE_string("policy_from", None, "Deprecated name of --init_from (the SFT workdir: "
                    "the initial policy and the KL reference).")
flags.DEFINE_string("reward_from", None,
                    "Reward-model workdir: the reward and the value model's initialisation.")
flags.DEFINE_string("prompt_file", "", "Prompt JSONL ({'prompt': ...}); default: the embedded "
                    "world's prompts_train.jsonl in --data_dir.")
flags.DEFINE_string("ptx_file", "", "Pretraining JSONL ({'text': ...}) for PPO-ptx; default: the "
                    "embedded world's pretrain_train.jsonl in --data_dir.")
flags.DEFINE_string("algorithm", "ppo", "RL algorithm, a key of instructjax/rlhf/algorithms.py: "
                    "ppo (value model, GAE), grpo (group-relative advantages, KL in the loss), "
                    "rloo (leave-one-out advantages, KL in the reward).")
flags.DEFINE_integer("group_size", 1, "Responses sampled per prompt (grpo and rloo: >= 2); "
                     "--rollout_batch_size counts responses.")
flags.DEFINE_string("reward", "model", "model: the reward model of --reward_from; execution: "
                    "run each completion against the tests of its problem in --prompt_file "
                    "(HumanEval format) in the sandbox.")
flags.DEFINE_float("pass_reward", 1.0, "--reward=execution: the reward of a passing completion.")
flags.DEFINE_float("error_penalty", 0.0, "--reward=execution: minus this for a timeout, crash "
                   "or out-of-memory (failed tests score 0).")
flags.DEFINE_string("sandbox", "bwrap", "--reward=execution: sandbox mode, bwrap or none.")
flags.DEFINE_float("timeout_s", 3.0, "--reward=execution: wall-clock limit of one test run.")
flags.DEFINE_integer("memory_mb", 1024, "--reward=execution: memory cap of one test run.")
flags.DEFINE_integer("workers", 0, "--reward=execution: parallel sandbox workers (0 = one per CPU).")
flags.DEFINE_integer("iterations", 100, "RL iterations (rollout + update each).")
flags.DEFINE_integer("rollout_batch_size", 32, "Responses per iteration, global.")
flags.DEFINE_integer("max_prompt_len", 64, "Prompt tokens (left-padded; longer prompts keep "
                     "their last tokens).")
flags.DEFINE_integer("max_new_tokens", 24, "Response tokens sampled per prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; log-probs use the same.")
flags.DEFINE_integer("ppo_epochs", 4, "Passes over each rollout batch.")
flags.DEFINE_integer("num_minibatches", 4, "Minibatches (optimiser updates) per epoch.")
flags.DEFINE_float("clip_eps", 0.2, "PPO ratio clip.")
flags.DEFINE_string("value_clip", "0.2", "Value-change clip; empty = unclipped.")
flags.DEFINE_float("vf_coef", 0.1, "Value-loss weight.")
flags.DEFINE_float("entropy_coef", 0.0, "Entropy bonus (InstructGPT: 0).")
flags.DEFINE_float("init_kl_coef", 0.02, "Initial (or fixed) KL coefficient beta.")
flags.DEFINE_string("kl_target", "", "Adaptive KL controller target (nats per response); "
                    "empty = fixed beta.")
flags.DEFINE_float("kl_horizon", 10000.0, "Adaptive KL controller horizon (episodes).")
flags.DEFINE_float("gamma", 1.0, "GAE discount.")
flags.DEFINE_float("lam", 0.95, "GAE lambda.")
flags.DEFINE_string("no_eos_penalty", "-1.0", "Score of responses without EOS within "
                    "--max_new_tokens; empty = keep the RM score.")
flags.DEFINE_float("reference_logprob_coef", 0.0, "Adds this x the SFT (reference) policy's "
                   "mean log-probability per response token to each response's score.")
flags.DEFINE_float("gamma_ptx", 0.0, "Pretraining-loss weight (PPO-ptx); 0 = plain PPO.")
flags.DEFINE_integer("ptx_batch_size", 8, "Pretraining rows per optimiser update (PPO-ptx).")
flags.DEFINE_integer("ptx_seq_len", 128, "Tokens per pretraining row (PPO-ptx).")

# experiments/common.py flags that have no meaning here.
REJECTED = {
    "model": "the policy's model comes from --init_from",
    "model_override": "the models come from --init_from / --reward_from",
    "steps": "use --iterations",
    "batch_size": "use --rollout_batch_size (and --ptx_batch_size)",
    "seq_len": "use --max_prompt_len / --max_new_tokens (and --ptx_seq_len)",
    "tokenizer_path": "the tokenizer comes from --init_from",
    "vocab_size": "the tokenizer comes from --init_from",
    "dropout_rate": "dropout is always off in RL",
    "train_files": "use --prompt_file / --ptx_file",
    "eval_files": "use --prompt_file / --ptx_file",
    "eval_every": "RL has no eval loop; score held-out prompts with the report",
    "rm_read": "the reward is read as the --reward_from model was trained (its workdir says)",
}


def _optional_float(name: str) -> float | None:
    text = getattr(FLAGS, name).strip()
    if not text or text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--{name} must be a number or empty, got {text!r}") from None


def config_from_flags():
    from instructjax.rlhf.execution_reward import ExecutionRewardConfig
    from instructjax.rlhf.ppo import PPOConfig
    for name, why in REJECTED.items():
        if FLAGS[name].present:
            raise ValueError(f"--{name} does not apply to RL: {why}")
    return PPOConfig(
        workdir=FLAGS.workdir, policy_from=renamed_flag("policy_from", "init_from") or "",
        reward_from=FLAGS.reward_from or "", data=common.data_config_from_flags(),
        optim=common.optim_config_from_flags(),
        prompt_file=FLAGS.prompt_file, ptx_file=FLAGS.ptx_file, mesh=FLAGS.mesh,
        algorithm=FLAGS.algorithm, group_size=FLAGS.group_size, reward=FLAGS.reward,
        execution=ExecutionRewardConfig(
            pass_reward=FLAGS.pass_reward, error_penalty=FLAGS.error_penalty,
            sandbox=FLAGS.sandbox, timeout_s=FLAGS.timeout_s, memory_mb=FLAGS.memory_mb,
            workers=FLAGS.workers),
        iterations=FLAGS.iterations, rollout_batch_size=FLAGS.rollout_batch_size,
        max_prompt_len=FLAGS.max_prompt_len, max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature, ppo_epochs=FLAGS.ppo_epochs,
        num_minibatches=FLAGS.num_minibatches, grad_accum_steps=FLAGS.grad_accum_steps,
        clip_eps=FLAGS.clip_eps, value_clip=_optional_float("value_clip"),
        vf_coef=FLAGS.vf_coef, entropy_coef=FLAGS.entropy_coef,
        init_kl_coef=FLAGS.init_kl_coef, kl_target=_optional_float("kl_target"),
        kl_horizon=FLAGS.kl_horizon, gamma=FLAGS.gamma, lam=FLAGS.lam,
        no_eos_penalty=_optional_float("no_eos_penalty"),
        reference_logprob_coef=FLAGS.reference_logprob_coef, gamma_ptx=FLAGS.gamma_ptx,
        ptx_batch_size=FLAGS.ptx_batch_size, ptx_seq_len=FLAGS.ptx_seq_len,
        compute_dtype=FLAGS.compute_dtype if FLAGS["compute_dtype"].present else "",
        remat=FLAGS.remat, seed=FLAGS.seed, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
        allow_config_change=FLAGS.allow_config_change)


main = common.experiment_main(config_from_flags, "instructjax.rlhf.ppo_run:train_ppo")


if __name__ == "__main__":
    app.run(main)
