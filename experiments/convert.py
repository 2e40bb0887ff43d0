"""Hugging Face checkpoints (GPT2LMHeadModel, LlamaForCausalLM; safetensors) in and out.

Import into a workdir that later stages take as --init_from (layer its model.flags after
the stage's flagfile so the model matches):

  python -m experiments.convert --to=ours --hf_dir=path/to/hf_model --workdir=runs/base
  python -m experiments.sft --flagfile=experiments/configs/demo_sft.flags \
      --flagfile=runs/base/model.flags --init_from=runs/base --workdir=runs/sft

Export a trained run (its latest params, and its tokenizer.model) for transformers:

  python -m experiments.convert --to=hf --workdir=runs/sft --hf_dir=runs/sft_hf

Tensors stream onto --mesh shard by shard; nothing is held unsharded on one device.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.errors import user_facing

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["ours", "hf"], "ours: --hf_dir -> --workdir; hf: --workdir -> --hf_dir.")
flags.DEFINE_string("hf_dir", None, "Hugging Face checkpoint directory (read, or written).")
flags.DEFINE_string("workdir", None, "instructjax workdir (written, or read).")
flags.DEFINE_string("mesh", "data:1,fsdp:-1,tensor:1", "Device mesh the params are sharded over.")
flags.DEFINE_string("tokenizer_path", "", "A sentencepiece .model to use instead of the "
                    "checkpoint's own tokenizer.model.")
flags.DEFINE_bool("require_tokenizer", True, "--to=ours: fail when no sentencepiece tokenizer "
                  "is available (Hugging Face tokenizer.json files are not converted).")
flags.DEFINE_bool("overwrite", False, "--to=hf: replace a non-empty --hf_dir.")
flags.DEFINE_integer("max_shard_mb", 5120, "--to=hf: largest safetensors file, in MiB.")
flags.mark_flags_as_required(["to", "hf_dir", "workdir"])


def main(argv):
    from instructjax.train import hf_workdir
    cfg = hf_workdir.ConvertConfig(
        to=FLAGS.to, hf_dir=FLAGS.hf_dir, workdir=FLAGS.workdir, mesh=FLAGS.mesh,
        tokenizer_path=FLAGS.tokenizer_path, require_tokenizer=FLAGS.require_tokenizer,
        max_shard_bytes=FLAGS.max_shard_mb * 2**20, overwrite=FLAGS.overwrite)
    hf_workdir.convert(cfg, argv=list(sys.argv))


if __name__ == "__main__":
    app.run(user_facing(main))
