"""The power analysis of the personalization benchmark's test sets (benchmarks.power), on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.personalize import batched_macro_f1 as macro_f1
from benchmarks.power import (
    UserTest,
    analyse,
    break_rate,
    expected_macro_f1,
    measured_gains,
    smallest_gain_meeting_targets,
    solve_rates,
)
from nightowl.adapters.train import scores


@pytest.mark.parametrize("n_labels", [2, 3])
def test_vectorized_macro_f1_is_the_projects_scores(n_labels):
    rng = np.random.default_rng(3)
    gold = rng.integers(0, n_labels, size=(200, 30))
    pred = rng.integers(0, n_labels, size=(200, 30))
    gold[:20] = 0  # users whose test labels are all one class
    pred[10:20] = 0
    got = macro_f1(gold, pred, n_labels)
    want = [100 * scores(g.tolist(), p.tolist(), n_labels)["macro_f1"] for g, p in zip(gold, pred)]
    assert got == pytest.approx(want)


def a_user(n: int, wrong: int, seed: int = 0) -> UserTest:
    """n binary test posts, a third ironic, the base wrong on `wrong` of them."""
    rng = np.random.default_rng(seed)
    gold = (np.arange(n) % 3 == 0).astype(int)
    base = gold.copy()
    flip = rng.choice(n, size=wrong, replace=False)
    base[flip] = 1 - base[flip]
    return UserTest("u", gold, base)


def test_the_break_rate_gives_the_precision_asked_for():
    r, wrong, right = 0.4, 10, 30
    w = break_rate(r, wrong, right, 0.75)
    assert r * wrong / (r * wrong + w * right) == pytest.approx(0.75)


def test_rates_are_solved_for_the_expected_gain_and_measurements_centre_on_it():
    t = a_user(400, 120)
    base = macro_f1(t.gold, t.base, 2).item()
    r, w, capped = solve_rates(t, 5.0, 0.75, 2)
    assert not capped and 0 < r < 1 and 0 < w < r
    assert expected_macro_f1(t, r, w, 2) - base == pytest.approx(5.0, abs=1e-6)
    gains = measured_gains(t, r, w, 2, draws=400, seeds=3, rng=np.random.default_rng(0))
    assert gains.mean() == pytest.approx(5.0, abs=0.5)


def test_a_user_the_base_gets_all_right_cannot_gain():
    t = a_user(30, 0)
    assert solve_rates(t, 5.0, 0.75, 2) == (0.0, 0.0, True)


def test_an_unchanged_model_is_measured_neither_better_nor_worse():
    gains = measured_gains(a_user(35, 10), 0.0, 0.0, 2, draws=50, seeds=3, rng=np.random.default_rng(1))
    assert (gains == 0).all()


def test_small_test_sets_hide_a_real_gain_that_large_ones_show():
    small = [a_user(35, 11, seed=s) for s in range(24)]
    large = [a_user(1000, 320, seed=s) for s in range(24)]
    # every user truly gains 5 points, 60% of the answers the model changes become right, and
    # the seeds' models change the same posts: 35 posts show it for far fewer users than 1,000 do
    kw = dict(gains=(5.0,), precisions=(0.6,), correlations=(1.0,), draws=100, seeds=3, resamples=200, progress=False)
    on_small, on_large = analyse(small, 2, **kw)[0], analyse(large, 2, **kw)[0]
    assert on_large["share_better"] > 0.95 and on_large["share_worse"] < 0.05
    assert on_small["share_better"] < 0.8 and on_small["share_worse"] > 0.15
    assert on_large["p_interval_above_0"] == 1.0
    assert smallest_gain_meeting_targets([on_large], 0.6, 1.0) == 5.0
    assert smallest_gain_meeting_targets([on_small], 0.6, 1.0) is None


def test_independent_seeds_average_away_part_of_the_noise():
    users = [a_user(35, 11, seed=s) for s in range(24)]
    kw = dict(gains=(5.0,), precisions=(0.75,), correlations=(0.0, 1.0), draws=150, seeds=3, resamples=100, progress=False)
    independent, same = analyse(users, 2, **kw)
    assert independent["seed_correlation"] == 0.0 and same["seed_correlation"] == 1.0
    assert independent["share_worse"] < same["share_worse"]
    assert independent["measured_gain_mean"] == pytest.approx(same["measured_gain_mean"], abs=0.6)
