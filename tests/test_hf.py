"""Hugging Face interop against transformers itself (torch, CPU) as the reference: logits of
imported and exported checkpoints, exact round trips, streaming onto sharded meshes, clear
errors, and the convert entry point."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from instructjax import parallel
from instructjax.config import ConfigError
from instructjax.data.tokenizer import train_tokenizer
from instructjax.model import hf
from instructjax.model.config import ModelConfig, preset
from instructjax.model.layout import unstack_layers
from instructjax.model.transformer import Transformer
from instructjax.train import hf_workdir, state as state_lib, workdir as wd

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
FSDP, TP = "data:1,fsdp:-1,tensor:1", "data:1,fsdp:4,tensor:2"
LLAMA_VOCAB = 320  # room for a byte-fallback sentencepiece tokenizer in the checkpoint


def _gpt2_hf():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
        eos_token_id=None))


def _llama_hf():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Randomly initialised transformers checkpoints, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for model, name in ((_gpt2_hf(), "gpt2"), (_llama_hf(), "llama")):
        with torch.no_grad():  # norms away from their 1/0 init, so a swapped map would show
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / name)
        if name == "llama":
            model.save_pretrained(root / "llama_sharded", max_shard_size="40KB")
    text = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the dog."] * 50
    train_tokenizer(text, root / "llama" / "tokenizer.model", vocab_size=300)
    return {name: root / name for name in ("gpt2", "llama", "llama_sharded")}


def _tokens(vocab, batch=2, length=16):
    return np.random.default_rng(1).integers(0, vocab, (batch, length)).astype(np.int32)


def _ours(cfg, params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    apply = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, positions,
                                                        np.ones_like(tokens)))
    return np.asarray(apply(params, tokens))


def _theirs(hf_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def _flat_np(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("name, scan", [("gpt2", False), ("llama", False), ("llama_sharded", False),
                                        ("gpt2", True), ("llama_sharded", True)])
def test_import_matches_transformers_logits(hf_dirs, name, scan):
    mesh = parallel.make_mesh(FSDP)
    cfg, params = hf.load_checkpoint(hf_dirs[name], mesh, scan_layers=scan)
    assert cfg.scan_layers == scan and ("layers" in params) == scan
    if name != "gpt2":
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (4, 2, False)
        assert (cfg.rope_theta, cfg.norm_eps) == (500000.0, 1e-6)
    if name == "llama_sharded":
        assert len(list(hf_dirs[name].glob("model-*-of-*.safetensors"))) > 1
        assert (hf_dirs[name] / "model.safetensors.index.json").is_file()
    tokens = _tokens(cfg.vocab_size)
    ours, theirs = _ours(cfg, params, tokens), _theirs(hf_dirs[name], tokens)
    assert ours.shape == theirs.shape == (2, 16, cfg.vocab_size)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs).max() > 1e-2  # not trivially small logits
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    _, want = state_lib.abstract_params(Transformer(cfg), mesh)
    assert jax.tree.map(lambda a: a.sharding, params) == want


def test_bfloat16_checkpoint_loads_as_float32(hf_dirs, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg, params = hf.load_checkpoint(tmp_path / "bf16", parallel.make_mesh(FSDP))
    down = params["layer_1"]["mlp"]["down"]["kernel"]
    assert down.dtype == np.float32
    want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    assert np.array_equal(np.asarray(down), want)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tensor_parallel_load_reads_only_each_shard(hf_dirs, name, monkeypatch):
    reads = []  # (checkpoint tensor, elements read) for every read from the files
    get_slice = hf._Tensors.get_slice

    class Recorder:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, box):
            out = self.inner[box]
            reads.append((self.key, out.size))
            return out

    monkeypatch.setattr(hf._Tensors, "get_slice", lambda self, k: Recorder(get_slice(self, k), k))
    mesh = parallel.make_mesh(TP)
    cfg, params = hf.load_checkpoint(hf_dirs[name], mesh)
    _, expected = state_lib.abstract_params(Transformer(cfg), mesh)
    layouts = hf.tensor_layouts(cfg)
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    limit = {}  # largest shard of the parameter(s) a checkpoint tensor holds
    for path, array in flat.items():
        assert array.sharding == want[path], path
        key = layouts[path].key
        limit[key] = max(limit.get(key, 0), array.addressable_shards[0].data.size)
    assert {key for key, _ in reads} == set(limit)
    for key, size in reads:
        assert size <= limit[key], (key, size, limit[key])
    query = flat[("layer_0", "attn", "query", "kernel")]
    assert query.sharding.spec == P("fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (16, 2, 16)
    assert flat[("layer_0", "attn", "key", "kernel")].sharding.spec == P("fsdp", "tensor", None)
    # Same logits as the 8-way FSDP load and as transformers.
    tokens = _tokens(cfg.vocab_size)
    _, fsdp_params = hf.load_checkpoint(hf_dirs[name], parallel.make_mesh(FSDP))
    ours = _ours(cfg, params, tokens)
    np.testing.assert_allclose(ours, _ours(cfg, fsdp_params, tokens), atol=1e-5)
    assert np.abs(ours - _theirs(hf_dirs[name], tokens)).max() < 1e-4


def _random_params(cfg, mesh, seed=0):
    """Random params placed on the mesh's shardings (host-made: no init compile). Norms and
    biases are off their 1/0 init, so a swapped or transposed mapping would show."""
    rng = np.random.default_rng(seed)
    abstract, shardings = hf.abstract_params(cfg, mesh)
    flat = {path: jax.device_put(
        (path[-1] == "scale") + (0.1 if len(s.shape) == 1 else 0.05)
        * rng.standard_normal(s.shape, np.float32), shardings[path])
        for path, s in abstract.items()}
    return traverse_util.unflatten_dict(flat)


EXPORT_CASES = {
    "gpt2": dict(family="gpt2", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                 d_ff=256, max_len=32, norm_eps=1e-5),
    "llama_gqa": dict(family="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=96, max_len=32, tie_embeddings=False,
                      rope_theta=500000.0, norm_eps=1e-6),
    "llama_tied_head_dim": dict(family="llama", vocab_size=128, d_model=64, n_layers=2,
                                n_heads=4, n_kv_heads=1, head_dim=8, d_ff=96, max_len=32,
                                tie_embeddings=True, norm_eps=1e-5),
}


@pytest.mark.parametrize("case, max_shard_bytes, scan", [
    ("gpt2", hf.DEFAULT_MAX_SHARD_BYTES, False), ("llama_gqa", 40_000, False),
    ("llama_tied_head_dim", 30_000, False), ("llama_gqa", 40_000, True)])
def test_export_runs_in_transformers_and_round_trips_exactly(tmp_path, case, max_shard_bytes,
                                                             scan):
    cfg = ModelConfig(**EXPORT_CASES[case], scan_layers=scan)
    mesh = parallel.make_mesh(TP)
    params = _random_params(cfg, mesh)
    out = hf.save_checkpoint(params, cfg, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_bytes < hf.DEFAULT_MAX_SHARD_BYTES:
        assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temp dirs left behind
    tokens = _tokens(cfg.vocab_size)
    ours = _ours(cfg, params, tokens)
    assert np.abs(ours - _theirs(out, tokens)).max() < 1e-4
    back_cfg, back = hf.load_checkpoint(out, mesh, scan_layers=scan)
    assert back_cfg == cfg
    a, b = _flat_np(params), _flat_np(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    if scan:  # the same files hold the unrolled layout of the same params
        _, unrolled = hf.load_checkpoint(out, mesh)
        a, b = _flat_np(unstack_layers(params)), _flat_np(unrolled)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Exporting again over the same directory replaces it (atomically, via a rename).
    hf.save_checkpoint(params, cfg, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def _copy(src, dst, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config:
        path = dst / "config.json"
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    return dst


def test_clear_errors(hf_dirs, tmp_path):
    mesh = parallel.make_mesh(FSDP)
    cases = [
        (lambda c: {**c, "model_type": "mistral"}, "config.json: field 'model_type': 'mistral'"),
        (lambda c: {**c, "architectures": ["LlamaForSequenceClassification"]}, "'architectures'"),
        (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         "'rope_scaling': RoPE type 'llama3' is not implemented"),
        (lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
         "'rope_parameters': RoPE type 'yarn'"),
        (lambda c: {**c, "attention_bias": True}, "'attention_bias': biases"),
        (lambda c: {**c, "hidden_act": "gelu"}, "'hidden_act'"),
        (lambda c: {k: v for k, v in c.items() if k != "hidden_size"},
         "required field 'hidden_size' is missing"),
        (lambda c: {**c, "vocab_size": 256}, "model.safetensors: tensor 'model.embed_tokens.weight' "
                                             "has shape (320, 64); config.json implies (256, 64)"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = _copy(hf_dirs["llama"], tmp_path / f"bad{i}", edit)
        with pytest.raises(hf.HFCheckpointError, match=re.escape(message)):
            hf.load_checkpoint(bad, mesh)
    gpt2 = _copy(hf_dirs["gpt2"], tmp_path / "gpt2",
                 lambda c: {**c, "activation_function": "relu"})
    with pytest.raises(hf.HFCheckpointError, match="activation_function"):
        hf.read_config(gpt2)
    missing = _copy(hf_dirs["llama_sharded"], tmp_path / "missing")
    next(missing.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-\d+\.safetensors.*not found"):
        hf.load_checkpoint(missing, mesh)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json not found"):
        hf.load_checkpoint(tmp_path / "empty", mesh)
    no_weights = _copy(hf_dirs["gpt2"], tmp_path / "no_weights")
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.*save_pretrained"):
        hf.load_checkpoint(no_weights, mesh)
    # A tensor our model has no parameter for (a bias) is refused, not silently dropped.
    from safetensors.numpy import load_file, save_file
    extra = _copy(hf_dirs["llama"], tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.HFCheckpointError, match="q_proj.bias"):
        hf.load_checkpoint(extra, mesh)
    # Tokenizers: sentencepiece loads; a tokenizer.json alone is reported, not ignored.
    assert hf.load_tokenizer(hf_dirs["llama"]).vocab_size == 300
    (gpt2 / "tokenizer.json").write_text("{}")
    with pytest.raises(hf.HFCheckpointError, match="only tokenizer.json.*does not convert"):
        hf.load_tokenizer(gpt2)
    # A reward model (scalar head) has no causal-LM equivalent.
    cfg = ModelConfig(**EXPORT_CASES["gpt2"])
    params = {**_random_params(cfg, mesh), "scalar_head": {"kernel": np.zeros((64, 1))}}
    with pytest.raises(hf.HFCheckpointError, match="scalar_head"):
        hf.save_checkpoint(params, cfg, tmp_path / "rm_hf")
    assert not (tmp_path / "rm_hf").exists()


def test_convert_round_trip_through_a_workdir(hf_dirs, tmp_path):
    """CLI import -> load_trained (what later stages read) -> library export -> transformers."""
    workdir, out = tmp_path / "ours", tmp_path / "exported"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.convert", "--to=ours",
           f"--hf_dir={hf_dirs['llama_sharded']}", f"--workdir={workdir}"]
    # llama_sharded has no tokenizer.model: refused with a clear message.
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no tokenizer.model" in result.stderr
    assert "--tokenizer_path" in result.stderr and not workdir.exists()
    cmd[4] = f"--hf_dir={hf_dirs['llama']}"
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    mesh = parallel.make_mesh(TP)
    model, params, tokenizer = wd.load_trained(workdir, mesh)
    assert tokenizer.vocab_size == 300
    _, direct = hf.load_checkpoint(hf_dirs["llama"], mesh)
    a, b = _flat_np(params), _flat_np(direct)
    assert all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    # model.flags rebuilds the same ModelConfig through the stages' flag parsing.
    from experiments.common import parse_override
    lines = (workdir / "model.flags").read_text().splitlines()[1:]
    base = lines[0].removeprefix("--model=")
    overrides = dict(parse_override(x.removeprefix("--model_override=")) for x in lines[1:])
    assert preset(base, **overrides) == model.cfg

    hf_workdir.convert(hf_workdir.ConvertConfig(to="hf", hf_dir=str(out), workdir=str(workdir),
                                                mesh=TP))
    assert (out / "tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
    exported = json.loads((out / "config.json").read_text())
    assert (exported["eos_token_id"], exported["pad_token_id"]) == (1, 0)
    tokens = _tokens(LLAMA_VOCAB)
    np.testing.assert_allclose(_theirs(out, tokens), _theirs(hf_dirs["llama"], tokens), atol=1e-5)
    again = hf_workdir.ConvertConfig(to="hf", hf_dir=str(out), workdir=str(workdir), mesh=TP)
    with pytest.raises(ConfigError, match="is not empty.*--overwrite"):
        hf_workdir.convert(again)
    hf_workdir.convert(dataclasses.replace(again, overwrite=True))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        hf_workdir.import_to_workdir(hf_workdir.ConvertConfig(
            to="ours", hf_dir=str(hf_dirs["llama"]), workdir=str(workdir)))
