"""Scaling-law fits (known exponents from noisy synthetic points, calibrated standard
errors) and the sweep driver end to end on two tiny models."""
import dataclasses
import inspect
import json
import textwrap

import numpy as np
import pytest

from instructjax import scaling
from instructjax.config import ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig
from instructjax.model.config import preset

N = np.geomspace(2e4, 3e6, 7)


def _noisy(loss, sigma, seed):
    return loss * np.exp(np.random.default_rng(seed).normal(0.0, sigma, loss.shape))


def test_fit_recovers_known_power_law():
    alpha, n_c = 0.076, 8.8e13  # Kaplan et al.'s L(N)
    fit = scaling.fit_power_law(N, _noisy((N / n_c) ** -alpha, 0.01, seed=0))
    assert abs(fit.alpha - alpha) < 3 * fit.alpha_se and 0 < fit.alpha_se < 0.01
    assert abs(np.log10(fit.n_c / n_c)) < 3 * fit.log10_n_c_se
    assert fit.l_inf == 0 and fit.points == len(N)
    exact = scaling.fit_power_law(N, (N / n_c) ** -alpha)  # no noise: exact, zero error
    assert exact.alpha == pytest.approx(alpha, rel=1e-9)
    assert exact.n_c == pytest.approx(n_c, rel=1e-6) and exact.alpha_se < 1e-9


def test_standard_errors_are_calibrated():
    """Over many noise draws, the truth lies within 2 standard errors about 95% of the time
    (a t-distribution with 5 degrees of freedom gives 89%)."""
    alpha, n_c, hits = 0.3, 1e5, 0
    for seed in range(300):
        fit = scaling.fit_power_law(N, _noisy((N / n_c) ** -alpha, 0.02, seed))
        hits += abs(fit.alpha - alpha) < 2 * fit.alpha_se
    assert 0.82 < hits / 300 < 0.97, hits


def test_fit_with_irreducible_loss():
    alpha, n_c, l_inf = 0.35, 2e4, 1.2
    loss = _noisy(l_inf + (N / n_c) ** -alpha, 0.002, seed=1)
    fit = scaling.fit_power_law(N, loss, irreducible=True)
    assert abs(fit.alpha - alpha) < 3 * fit.alpha_se < 0.2, fit
    assert abs(fit.l_inf - l_inf) < 3 * fit.l_inf_se, fit
    np.testing.assert_allclose(fit.predict(N), loss, rtol=0.01)
    # The pure power law cannot bend: it fits these points far worse.
    assert scaling.fit_power_law(N, loss).rms_log_residual > 3 * fit.rms_log_residual


@pytest.mark.parametrize("n, loss, message", [
    ([1e4, 2e4], [3.0], "1-D of one length"),
    ([1e4, -2e4, 3e4], [3.0, 2.0, 1.0], "positive and finite"),
    ([1e4, 2e4, 3e4], [3.0, np.nan, 1.0], "positive and finite"),
    ([1e4], [3.0], "at least 2 points"),
])
def test_fit_rejects_bad_points(n, loss, message):
    with pytest.raises(ValueError, match=message):
        scaling.fit_power_law(n, loss)


SEQ = 32


def _base(tmp_path, files, steps=2):
    return RunConfig(
        task="pretrain", workdir=str(tmp_path / "unused"), model=preset("tiny"),
        data=DataConfig(data_dir=str(tmp_path / "data"), train_files=(files[0],),
                        eval_files=(files[1],), vocab_size=512),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
        train=TrainConfig(steps=steps, batch_size=8, seq_len=SEQ, log_every=1, eval_every=100,
                          eval_batches=1, checkpoint_every=100))


def _tiny(d_model, layers):
    return preset("tiny", d_model=d_model, n_layers=layers, n_heads=2, n_kv_heads=2,
                  d_ff=2 * d_model, vocab_size=512, max_len=SEQ)


def test_config_validation(tmp_path):
    base = _base(tmp_path, ("a", "b"))
    a, b = ("a", _tiny(16, 1)), ("b", _tiny(32, 1))
    for models, irreducible, message in [
            ((a,), False, "at least as many sizes"), ((a, b), True, "at least as many sizes"),
            ((a, ("a", _tiny(32, 2))), False, "each size once"),
            ((a, ("c", _tiny(16, 1))), False, "same non-embedding parameter count")]:
        with pytest.raises(ConfigError, match=message):
            scaling.ScalingConfig(workdir=str(tmp_path), base=base, models=models,
                                  irreducible=irreducible)
    with pytest.raises(ConfigError, match="each seed once"):
        scaling.ScalingConfig(workdir=str(tmp_path), base=base, models=(a, b), seeds=(1, 1))
    for rates in [(1e-3,), (1e-3, 0.0)]:
        with pytest.raises(ConfigError, match="one positive rate per size"):
            scaling.ScalingConfig(workdir=str(tmp_path), base=base, models=(a, b),
                                  learning_rates=rates)
    with pytest.raises(ConfigError, match="exceeds the max_len"):
        scaling.ScalingConfig(workdir=str(tmp_path), base=base,
                              models=(a, ("b", dataclasses.replace(b[1], max_len=16))))


def _files(tmp_path) -> list[str]:
    files = []
    for split, module in (("train", inspect), ("eval", textwrap)):
        path = tmp_path / f"{split}.jsonl"
        source = inspect.getsource(module)
        path.write_text("".join(json.dumps({"text": source[i:i + 2000]}) + "\n"
                                for i in range(0, min(len(source), 60_000), 2000)))
        files.append(str(path))
    return files


def test_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    files = _files(tmp_path)
    models = (("small", _tiny(16, 1)), ("large", _tiny(48, 2)))
    cfg = scaling.ScalingConfig(workdir=str(tmp_path / "sweep"), base=_base(tmp_path, files),
                                models=models, learning_rates=(3e-3, 1e-3))
    result = scaling.run_sweep(cfg, argv=["test"])

    sweep = tmp_path / "sweep"
    assert json.loads((sweep / scaling.RESULTS_FILE).read_text()) == result
    assert (sweep / scaling.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = result["sizes"]
    assert [r["size"] for r in rows] == ["small", "large"]
    for r, (name, model), rate in zip(rows, models, cfg.learning_rates):
        assert r["non_embedding_params"] == model.num_params(non_embedding=True)
        final = json.loads((sweep / name / "final_eval.json").read_text())
        assert final["step"] == 2 and r["eval_loss"] == final["eval/loss"]
        # Every size used the sweep's one tokenizer.
        run = json.loads((sweep / name / "run_config.json").read_text())
        assert run["config"]["data"]["tokenizer_path"] == str(sweep / "tokenizer.model")
        assert run["config"]["optim"]["learning_rate"] == r["learning_rate"] == rate
    assert result["tokens_per_size"] == 2 * 8 * SEQ
    assert result["fit"]["alpha_se"] is None  # two points: an exact fit, no error bar
    assert "fitted exponent alpha" in capsys.readouterr().out

    # A rerun trains nothing: every size has finished.
    from instructjax.train import run as run_lib
    monkeypatch.setattr(run_lib, "train_lm", lambda *a, **k: pytest.fail("retrained a size"))
    again = scaling.run_sweep(cfg)
    assert [r["eval_loss"] for r in again["sizes"]] == [r["eval_loss"] for r in rows]
    # Another token budget in the same workdir is a different sweep, not a resume.
    longer = dataclasses.replace(cfg, base=_base(tmp_path, files, steps=3))
    with pytest.raises(ConfigError, match=r"size small: .*\(train\.steps: 2 then, 3 now\)"):
        scaling.run_sweep(longer)



@pytest.mark.slow
def test_sweep_over_seeds(tmp_path, capsys):
    files = _files(tmp_path)
    models = (("small", _tiny(16, 1)), ("large", _tiny(48, 2)))
    cfg = scaling.ScalingConfig(workdir=str(tmp_path / "sweep"), base=_base(tmp_path, files),
                                models=models, learning_rates=(3e-3, 1e-3))
    rows = scaling.run_sweep(cfg, argv=["test"])["sizes"]
    # Several seeds: each size's loss is their mean, the spread is reported; seed 0 is the
    # run above, seed 1 another run.
    seeds = scaling.run_sweep(dataclasses.replace(cfg, workdir=str(tmp_path / "seeds"),
                                                  seeds=(0, 1)))
    for r, one in zip(seeds["sizes"], rows):
        finals = [json.loads((tmp_path / "seeds" / r["size"] / f"seed_{s}" / "final_eval.json")
                             .read_text())["eval/loss"] for s in (0, 1)]
        assert r["seeds"] == [0, 1] and r["eval_losses"] == finals
        assert finals[0] == one["eval_loss"] and finals[1] != finals[0]
        assert r["eval_loss"] == pytest.approx(np.mean(finals))
        assert r["eval_loss_std"] == pytest.approx(np.std(finals, ddof=1))
    assert seeds["fit"]["alpha"] == pytest.approx(scaling.fit_power_law(
        [r["non_embedding_params"] for r in seeds["sizes"]],
        [r["eval_loss"] for r in seeds["sizes"]]).alpha)
    headers = [line for line in capsys.readouterr().out.splitlines() if "non-emb" in line]
    assert " sd " not in headers[0] and " sd " in headers[-1]

