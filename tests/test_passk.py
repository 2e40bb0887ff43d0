"""pass@k against exact rational arithmetic; ranking of samples; the temperature-sweep plot."""
import math
from fractions import Fraction

import numpy as np
import pytest

from instructjax.codex import passk, ranking


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def _grid():
    for n in (1, 2, 7, 200, 10_000):
        cs = {0, 1, 2, 3, n // 100, n // 10, n // 3, n // 2, n - 10, n - 1, n}
        ks = {1, 2, 5, 10, 50, 100, 1000, n - 1, n}
        for c in sorted(x for x in cs if 0 <= x <= n):
            for k in sorted(x for x in ks if 1 <= x <= n):
                yield n, c, k


def test_matches_exact_fractions_on_grid():
    grid = list(_grid())
    assert any(n == 200 for n, _, _ in grid) and any(n == 10_000 for n, _, _ in grid)
    for n, c, k in grid:
        got = float(passk.pass_at_k(n, c, k))
        want = float(_exact(n, c, k))
        assert abs(got - want) <= 1e-12, (n, c, k, got, want)


def test_small_values_keep_relative_precision():
    # pass@1 with one pass in 10,000 samples, and pass@k near 1: no cancellation.
    assert float(passk.pass_at_k(10_000, 1, 1)) == pytest.approx(1e-4, rel=1e-13)
    got = float(passk.pass_at_k(10_000, 2, 3))
    assert got == pytest.approx(float(_exact(10_000, 2, 3)), rel=1e-12)


def test_vectorised_over_problems_with_different_n():
    n = np.array([1, 5, 200, 10_000, 200, 10])
    c = np.array([1, 2, 17, 123, 0, 10])
    for k in (1, 2, 5):
        got = passk.pass_at_k(n, c, k)
        assert got.shape == (6,)
        for j in range(6):
            if k > n[j]:
                assert np.isnan(got[j])
            else:
                assert abs(got[j] - float(_exact(int(n[j]), int(c[j]), k))) <= 1e-12


def test_k_larger_than_n():
    assert np.isnan(passk.pass_at_k(5, 5, 6))
    with pytest.raises(ValueError, match="pass@10 is undefined"):
        passk.mean_pass_at_k([20, 5], [1, 1], [1, 10])
    means = passk.mean_pass_at_k([20, 5], [1, 1], [1, 10], skip_undefined=True)
    assert list(means) == [1]
    assert means[1] == pytest.approx((1 / 20 + 1 / 5) / 2)


def test_mean_pass_at_k_and_edge_values():
    means = passk.mean_pass_at_k([4, 4], [0, 4], [1, 2, 4])
    assert means == {1: 0.5, 2: 0.5, 4: 0.5}
    assert float(passk.pass_at_k(4, 1, 2)) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)


@pytest.mark.parametrize("bad", [dict(n=[3], c=[4], k=1), dict(n=[0], c=[0], k=1),
                                 dict(n=[3], c=[-1], k=1), dict(n=[3], c=[1], k=0),
                                 dict(n=[3, 4], c=[1], k=1), dict(n=[2.5], c=[1], k=1)])
def test_bad_inputs_raise(bad):
    with pytest.raises(ValueError):
        passk.pass_at_k(np.array(bad["n"]), np.array(bad["c"]), bad["k"])


def test_parse_ks():
    assert passk.parse_ks("10, 1,100,1") == (1, 10, 100)
    for bad in ("0", "1,-3", "a", ""):
        with pytest.raises(ValueError):
            passk.parse_ks(bad)


def test_counts_by_problem():
    ids, n, c = passk.counts_by_problem(["b", "a", "b", "b"], [True, False, False, True])
    assert ids == ["b", "a"] and n.tolist() == [3, 1] and c.tolist() == [2, 0]


# Three problems, hand-made: which samples passed, and their log-probabilities.
PASSED = [[True, False, False, False], [False, False, True], [False, False]]
SUM_LP = [[-9.0, -2.0, -5.0, -7.0], [-3.0, -8.0, -1.0], [-1.0, -2.0]]
MEAN_LP = [[-0.5, -1.0, -0.9, -0.8], [-0.2, -0.4, -0.3], [-0.1, -0.1]]


def test_rankings_by_hand():
    # sum: picks samples 1 (fail), 2 (pass), 0 (fail) -> 1/3.
    assert ranking.pass1_by_score(PASSED, SUM_LP) == pytest.approx(1 / 3)
    # mean: picks 0 (pass), 0 (fail), a tie on the last (both fail) -> 1/3.
    assert ranking.pass1_by_score(PASSED, MEAN_LP) == pytest.approx(1 / 3)
    # random: (1/4 + 1/3 + 0) / 3.
    assert ranking.pass1_random(PASSED) == pytest.approx((1 / 4 + 1 / 3) / 3)
    assert ranking.pass1_oracle(PASSED) == pytest.approx(2 / 3)
    table = ranking.compare_rankings(PASSED, SUM_LP, MEAN_LP)
    assert set(table) == {"mean_logprob", "sum_logprob", "random", "oracle"}


def test_ties_count_as_expected_value():
    # Top score shared by a passing and a failing sample: half credit.
    assert ranking.pass1_by_score([[True, False, True]], [[-1.0, -1.0, -3.0]]) == 0.5


def test_random_pick_equals_pass_at_1():
    n, c = np.array([4, 3, 2]), np.array([1, 1, 0])
    assert ranking.pass1_random(PASSED) == pytest.approx(passk.mean_pass_at_k(n, c, [1])[1])


def test_ranking_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="pass flags but"):
        ranking.pass1_by_score([[True, False]], [[-1.0]])


def test_best_temperature_and_plot(tmp_path):
    curves = {0.2: {1: 0.30, 10: 0.45}, 0.8: {1: 0.20, 10: 0.55, 100: 0.7}}
    best = ranking.best_temperature_per_k(curves)
    assert best == {1: {"temperature": 0.2, "pass_at_k": 0.30},
                    10: {"temperature": 0.8, "pass_at_k": 0.55},
                    100: {"temperature": 0.8, "pass_at_k": 0.7}}
    path = ranking.plot_passk_vs_k(curves, tmp_path / "plots" / "passk_vs_k.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["passk_vs_k.png"]  # no temp file left
    with pytest.raises(ValueError):
        ranking.plot_passk_vs_k({}, tmp_path / "empty.png")
