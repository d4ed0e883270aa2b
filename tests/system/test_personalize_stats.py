"""The personalization benchmark's statistics and feedback simulator, on known cases."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from benchmarks.personalize import DEFAULT_ROWS, ROWS, Protocol, answer_stats, bootstrap_ci, paired_gain
from nightowl.settings import UpdateConfig


def test_bootstrap_interval_of_a_constant_is_the_constant():
    assert bootstrap_ci([2.5] * 30) == (2.5, 2.5)


def test_bootstrap_interval_matches_the_normal_interval_on_a_large_sample():
    # 2,000 draws of N(1, 2^2): the mean's 95% interval is about 1 +- 1.96 * 2 / sqrt(2000) = +-0.088
    x = np.random.default_rng(7).normal(1.0, 2.0, size=2000)
    lo, hi = bootstrap_ci(x, resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.015)
    assert hi == pytest.approx(x.mean() + half, abs=0.015)
    assert lo < x.mean() < hi


def test_bootstrap_interval_of_two_values():
    # resampling [0, 10] twice: means 0 (1/4), 5 (1/2), 10 (1/4): the 95% interval spans 0..10
    assert bootstrap_ci([0.0, 10.0], resamples=20000) == (0.0, 10.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_gains_are_paired_user_by_user():
    row = [{"a": {"macro_f1": 60.0}, "b": {"macro_f1": 50.0}}]
    base = [{"a": {"macro_f1": 55.0}, "b": {"macro_f1": 52.0}}]
    assert paired_gain(row, base, ["a", "b"]).tolist() == [[5.0, -2.0]]


def test_answer_stats_compare_a_rows_answers_with_the_bases_post_by_post():
    labels, truth = ["x", "y"], {"a": ["x", "y", "x", "y"], "b": ["x", "x"]}
    base = [{"a": {"answers": ["x", "x", "x", "x"]}, "b": {"answers": ["x", "x"]}}] * 2
    row = [{"a": {"answers": ["x", "y", "y", "x"]}, "b": {"answers": ["x", "y"]}},  # changes a2 (right), a3, b2
           {"a": {"answers": ["x", "y", "x", "y"]}, "b": {"answers": ["x", "x"]}}]  # changes a2, a4 (both right)
    s = answer_stats(row, base, ["a", "b"], truth, labels, resamples=200)
    assert s["share_changed"] == round(5 / 12, 4) and s["changed_right"] == 0.6
    # seed 0 changed 3 posts, seed 1 changed 1 of them (a2); seed 1 changed 2, seed 0 1 of them
    assert s["changes_repeated"] == round(2 / 5, 4)
    assert s["seed_correlation"] == round((2 / 5 - 5 / 12) / (1 - 5 / 12), 4)
    assert s["users"] == 2 and s["users_clearly_worse"] == 0
    same = answer_stats(base, base, ["a", "b"], truth, labels)
    assert same["changed_right"] is None and same["users_clearly_better"] == same["users_clearly_worse"] == 0
    assert answer_stats([{"a": {"macro_f1": 1.0}}], [{"a": {"macro_f1": 1.0}}], ["a"], truth, labels) is None  # older runs


def test_a_user_whose_every_test_post_turns_right_is_clearly_better():
    labels = ["x", "y"]
    truth = {"a": ["x", "y"] * 20}
    base = [{"a": {"answers": ["x"] * 40}}]
    row = [{"a": {"answers": ["x", "y"] * 20}}]
    s = answer_stats(row, base, ["a"], truth, labels, resamples=200)
    assert s["users_clearly_better"] == 1 and s["changed_right"] == 1.0 and s["seed_correlation"] is None


def test_labelled_protocol_labels_every_post():
    p, rng = Protocol("labelled"), random.Random(0)
    assert [p.feedback(served, truth, rng) for served, truth in [("x", "x"), ("x", "y"), ("y", "x")]] == ["x", "y", "x"]


def test_realistic_protocol_corrects_wrong_answers_at_p_and_confirms_right_ones_rarely():
    p, rng = Protocol("realistic", p_correct=0.3, p_confirm=0.05), random.Random(1)
    wrong = Counter(p.feedback("ironic", "not_ironic", rng) for _ in range(20000))
    right = Counter(p.feedback("ironic", "ironic", rng) for _ in range(20000))
    # a wrong answer is corrected (the true label) ~30% of the time, else left standing (None)
    assert set(wrong) == {"not_ironic", None} and wrong["not_ironic"] / 20000 == pytest.approx(0.3, abs=0.015)
    # a right one is confirmed ~5% of the time, never "corrected" to another label
    assert set(right) == {"ironic", None} and right["ironic"] / 20000 == pytest.approx(0.05, abs=0.006)
    always = Protocol("realistic", p_correct=1.0, p_confirm=0.0)
    assert always.feedback("a", "b", rng) == "b" and always.feedback("a", "a", rng) is None
    assert Protocol("realistic", 0.3).key == "realistic_p0.3" and Protocol("labelled").key == "labelled"


def test_the_nightowl_row_runs_the_products_default_update_settings():
    assert "nightowl" in DEFAULT_ROWS
    row = ROWS["nightowl"]
    assert row.kind == "nightly" and row.update == {}
    assert row.update_config() == UpdateConfig()
    # every ablation changes real UpdateConfig fields (a typo would fail here, not at night)
    for name, r in ROWS.items():
        if r.kind == "nightly":
            assert set(r.update) <= set(UpdateConfig.model_fields), name
            r.update_config()
