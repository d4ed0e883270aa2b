"""How large must a user's gain be before their private test set can show it? A power analysis of
the personalization benchmark's per-user test sets.

    python -m benchmarks.power --stream FILE.jsonl --out RESULTS.json [--users 24] [--seeds 3]

`benchmarks.personalize` scores each user's model on that user's private test posts (MultiPICo-EN:
a median of 35) and counts a user "better" or "worse" than the base by the sign of the difference.
On so few posts that sign is partly chance. This asks how often it is right: for every eligible
user (the same rule and seeded subset as `benchmarks.personalize`), the base model answers the
user's test posts; a *hypothetical* personal model is simulated on top of those answers, one that
truly gains `g` macro-F1 points for every user:
- each test post the base gets wrong it gets right with probability r, each one the base gets
  right it gets wrong with probability w (to another label, at random), where `precision` is the
  share of the answers it changes that become right (w = r * wrong * (1 - precision) /
  (precision * right)); r is solved per user so that its expected macro-F1 on the user's test set
  (the macro-F1 of the expected confusion matrix) is the base's plus g; a user whose test set
  cannot hold that gain (r capped at 1, or w at 1) gets the largest it can (counted as `capped`);
- a measurement is what the benchmark does: a test set drawn again from the user's posts (a
  bootstrap resample, the sampling the benchmark's test split stands for), the model's answers
  drawn once per seed, the user's gain averaged over the seeds, "better" if above 0 and "worse"
  if below; the 95% percentile bootstrap interval over users of the mean gain, as the tables give it.
  The seeds' models change posts independently (`seed_correlation` 0: averaging over seeds
  removes that noise) or change the same posts (1: it removes none); the benchmark measures
  where real runs lie (`answers_vs_base.seed_correlation` in its results).
Repeated `--draws` times: the expected share of users measured better and worse, and how often the
interval's lower bound is above 0, for every g and precision. The smallest g that meets the
benchmark's targets (>= 80% of users better, <= 5% worse) is reported per precision.

The test labels are read only to know what the base gets right on them (no setting is chosen
here); nothing is trained but the base model `benchmarks.personalize` uses (cached).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from tqdm import tqdm

from benchmarks.personalize import BenchConfig, Inputs, eligible_users, train_base, users_rule
from benchmarks.personalize import batched_macro_f1 as macro_f1
from benchmarks.stream import read_stream
from nightowl.adapters.train import scores
from nightowl.io import atomic_write_text

GAINS = (1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0)  # true per-user macro-F1 gains, points
PRECISIONS = (0.6, 0.75, 0.9)  # share of a model's changed answers that become right
# How alike the seeds' models are on a user's test posts: 0 independent (averaging the seeds
# removes their noise), 1 the same changes every seed (it removes none). Real runs lie between:
# a seed re-deals the same feedback and retrains, so much of what a user's model learns recurs.
SEED_CORRELATIONS = (0.0, 1.0)
TARGET_BETTER, TARGET_WORSE = 0.80, 0.05  # issue 13's per-user targets


@dataclass(frozen=True)
class UserTest:
    """One user's private test set as the base model answers it (label indices)."""

    user: str
    gold: np.ndarray
    base: np.ndarray


# -- the hypothetical model ----------------------------------------------------------------------

def break_rate(r: float, wrong: int, right: int, precision: float) -> float:
    """w for fix rate r: expected fixes r*wrong over all changes r*wrong + w*right = precision."""
    return 0.0 if right == 0 else r * wrong * (1 - precision) / (precision * right)


def expected_macro_f1(t: UserTest, r: float, w: float, n_labels: int) -> float:
    """Macro-F1 (points) of the model's expected confusion matrix on the user's test set."""
    gold, pred, weight = [], [], []
    for y, b in zip(t.gold.tolist(), t.base.tolist()):
        if y != b:
            gold += [y, y]
            pred += [y, b]
            weight += [r, 1 - r]
        else:
            others = [c for c in range(n_labels) if c != y]
            gold += [y] * (1 + len(others))
            pred += [y] + others
            weight += [1 - w] + [w / len(others)] * len(others)
    return 100 * scores(gold, pred, n_labels, weight)["macro_f1"]


def solve_rates(t: UserTest, gain: float, precision: float, n_labels: int) -> tuple[float, float, bool]:
    """(r, w, capped): the fix rate whose expected macro-F1 is the base's plus `gain` (bisection:
    the gain grows with r when precision > 1/2), or the largest one allowed (capped)."""
    wrong, right = int((t.gold != t.base).sum()), int((t.gold == t.base).sum())
    if wrong == 0:
        return 0.0, 0.0, True  # nothing to fix
    r_max = min(1.0, precision * right / (wrong * (1 - precision))) if right and precision < 1 else 1.0
    base = macro_f1(t.gold, t.base, n_labels).item()

    def gain_at(r: float) -> float:
        return expected_macro_f1(t, r, break_rate(r, wrong, right, precision), n_labels) - base

    if gain_at(r_max) <= gain:
        return r_max, break_rate(r_max, wrong, right, precision), True
    lo, hi = 0.0, r_max
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gain_at(mid) < gain else (lo, mid)
    r = (lo + hi) / 2
    return r, break_rate(r, wrong, right, precision), False


# -- measurements as the benchmark makes them ----------------------------------------------------

def measured_gains(t: UserTest, r: float, w: float, n_labels: int, draws: int, seeds: int,
                   rng: np.random.Generator, seed_correlation: float = 0.0) -> np.ndarray:
    """[draws] the user's gain as the benchmark would measure it: a test set drawn again from the
    user's posts, the model's answers drawn for each seed, the gain averaged over the seeds.
    `seed_correlation`: the chance that a seed changes a post exactly as the first seed did
    (1: every seed's model changes the same posts, so averaging over seeds removes none of the
    noise; 0: independent seeds). Each seed's own rates stay r and w either way."""
    n = len(t.gold)
    idx = rng.integers(0, n, size=(draws, n))
    gold, base = t.gold[idx], t.base[idx]
    u = rng.random((draws, seeds, n))
    same = rng.random((draws, seeds, n)) < seed_correlation
    u = np.where(same, u[:, :1, :], u)  # a mixture of uniforms is uniform: the rates hold
    shift = rng.integers(1, n_labels, size=(draws, seeds, n)) if n_labels > 2 else 1
    wrong = (base != gold)[:, None, :]
    broken = (gold[:, None, :] + shift) % n_labels  # another label than the right one
    pred = np.where(wrong, np.where(u < r, gold[:, None, :], base[:, None, :]),
                    np.where(u < w, broken, base[:, None, :]))
    return (macro_f1(gold[:, None, :], pred, n_labels) - macro_f1(gold, base, n_labels)[:, None]).mean(axis=1)


def share_summary(gains: np.ndarray, resamples: int, rng: np.random.Generator) -> dict:
    """Expected shares over draws of a [draws, users] array of measured gains, and how often the
    95% bootstrap interval over users of the mean gain lies above 0."""
    draws, users = gains.shape
    lower = np.empty(draws)
    for d in range(draws):
        means = gains[d][rng.integers(0, users, size=(resamples, users))].mean(axis=1)
        lower[d] = np.quantile(means, 0.025)
    better, worse = (gains > 0).mean(axis=1), (gains < 0).mean(axis=1)
    return {
        "measured_gain_mean": round(float(gains.mean()), 3),
        "share_better": round(float(better.mean()), 3),
        "share_worse": round(float(worse.mean()), 3),
        "share_better_p10_p90": [round(float(x), 3) for x in np.quantile(better, [0.1, 0.9])],
        "share_worse_p10_p90": [round(float(x), 3) for x in np.quantile(worse, [0.1, 0.9])],
        "p_meets_share_targets": round(float(((better >= TARGET_BETTER) & (worse <= TARGET_WORSE)).mean()), 3),
        "p_interval_above_0": round(float((lower > 0).mean()), 3),
    }


def analyse(tests: list[UserTest], n_labels: int, gains=GAINS, precisions=PRECISIONS, correlations=SEED_CORRELATIONS,
            draws: int = 400, seeds: int = 3, resamples: int = 1000, seed: int = 0, progress: bool = True) -> list[dict]:
    """One entry per (precision, seed correlation, gain): the model's rates per user and the
    measured shares."""
    rng = np.random.default_rng(seed)
    out = []
    grid = [(p, g) for p in precisions for g in gains]
    with tqdm(total=len(grid) * len(correlations), desc="precision x gain x correlation", unit="cell", disable=not progress) as bar:
        for precision, gain in grid:
            rates = [solve_rates(t, gain, precision, n_labels) for t in tests]
            changed = [float((r * (t.gold != t.base).sum() + w * (t.gold == t.base).sum()) / len(t.gold))
                       for t, (r, w, _) in zip(tests, rates)]
            for rho in correlations:
                measured = np.stack([measured_gains(t, r, w, n_labels, draws, seeds, rng, rho)
                                     for t, (r, w, _) in zip(tests, rates)], axis=1)
                out.append({"precision": precision, "seed_correlation": rho, "true_gain": gain,
                            "capped_users": sum(c for _, _, c in rates),
                            "answers_changed_median": round(statistics.median(changed), 3),
                            **share_summary(measured, resamples, rng)})
                bar.update()
    return out


def smallest_gain_meeting_targets(cells: list[dict], precision: float, seed_correlation: float) -> float | None:
    """The smallest true gain whose expected shares meet both targets (None: none on the grid)."""
    ok = [c["true_gain"] for c in cells if c["precision"] == precision and c["seed_correlation"] == seed_correlation
          and c["share_better"] >= TARGET_BETTER and c["share_worse"] <= TARGET_WORSE]
    return min(ok) if ok else None


# -- the command ---------------------------------------------------------------------------------

def user_tests(stream_path: Path, users: int | None, base_model: Path | None) -> tuple[list[UserTest], list[str], dict]:
    """The eligible users' test sets with the base model's answers (the personalize benchmark's
    base, trained on day 0 and cached, unless `base_model`)."""
    from nightowl.adapters.predictor import Predictor
    from nightowl.settings import Settings

    stream = read_stream(stream_path)
    cfg = BenchConfig(stream=stream_path, out=Path("power.json"), users=users, base_model=base_model)
    chosen = eligible_users(stream, cfg)
    base_dir = train_base(stream, cfg)
    predictor = Predictor(Settings(home=cfg.work / "homes" / "power", rationale_provider="none",
                                   labels=stream.labels, base_model_dir=base_dir), base_dir)
    inputs, tests = Inputs(), []
    for u in tqdm(chosen, desc="base answers, test sets", unit="user"):
        rows = stream.test(u)
        answers = [p.label for p in predictor.predict_inputs(inputs(rows))]
        tests.append(UserTest(u, np.array([stream.labels.index(r.label) for r in rows]),
                              np.array([stream.labels.index(a) for a in answers])))
    facts = {"users_rule": users_rule(cfg), "base_model_dir": str(base_dir), "stream_header": stream.header}
    return tests, stream.labels, facts


def test_set_facts(tests: list[UserTest], n_labels: int) -> dict:
    """What limits the measurement: test posts per user, the rarest label's count, the base's score."""
    counts = [np.bincount(t.gold, minlength=n_labels) for t in tests]
    rarest = [int(c[c > 0].min()) for c in counts]  # the rarest label the user's test set has
    base = [macro_f1(t.gold, t.base, n_labels).item() for t in tests]
    return {"test_posts_median": statistics.median(len(t.gold) for t in tests),
            "test_posts_min_max": [min(len(t.gold) for t in tests), max(len(t.gold) for t in tests)],
            "rarest_label_posts_median": statistics.median(rarest),
            "users_with_a_label_under_5_posts": sum(x < 5 for x in rarest),
            "base_macro_f1_mean": round(statistics.fmean(base), 3),
            "base_accuracy_mean": round(100 * statistics.fmean(float((t.gold == t.base).mean()) for t in tests), 3)}


def plot(result: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    styles = ("--", "-", ":", "-.")
    for i, precision in enumerate(result["precisions"]):
        colour = plt.cm.tab10(i % 10)
        for j, rho in enumerate(result["seed_correlations"]):
            style = styles[j % len(styles)]
            cells = [c for c in result["cells"] if c["precision"] == precision and c["seed_correlation"] == rho]
            xs = [c["true_gain"] for c in cells]
            for ax, key in zip(axes, ("share_better", "share_worse")):
                ys = [100 * c[key] for c in cells]
                lo = [100 * c[f"{key}_p10_p90"][0] for c in cells]
                hi = [100 * c[f"{key}_p10_p90"][1] for c in cells]
                ax.plot(xs, ys, marker="o", ls=style, color=colour, label=f"precision {precision:g}, seed corr. {rho:g}")
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.08)
    axes[0].axhline(100 * TARGET_BETTER, color="black", ls="--", lw=1, label="target")
    axes[1].axhline(100 * TARGET_WORSE, color="black", ls="--", lw=1, label="target")
    axes[0].set_ylabel("users measured better (%, 10-90% of draws)")
    axes[1].set_ylabel("users measured worse (%, 10-90% of draws)")
    for ax in axes:
        ax.set_xlabel("true macro-F1 gain of every user (points)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['n_users']} users, test sets of median {result['test_sets']['test_posts_median']:g} "
                 f"posts, {result['seeds']} seeds a user")
    fig.tight_layout()
    path = out.with_name(f"{out.stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def run(stream: Path, out: Path, users: int | None = None, base_model: Path | None = None, draws: int = 400,
        seeds: int = 3, gains=GAINS, precisions=PRECISIONS, correlations=SEED_CORRELATIONS) -> dict:
    t0 = time.perf_counter()
    tests, labels, facts = user_tests(stream, users, base_model)
    cells = analyse(tests, len(labels), gains, precisions, correlations, draws=draws, seeds=seeds)
    result = {
        "benchmark": "power", "stream": str(stream), "labels": labels, **facts,
        "n_users": len(tests), "seeds": seeds, "draws": draws,
        "targets": {"share_better_at_least": TARGET_BETTER, "share_worse_at_most": TARGET_WORSE},
        "test_sets": test_set_facts(tests, len(labels)),
        "precisions": list(precisions), "gains": list(gains),
        "seed_correlations": list(correlations),
        "smallest_gain_meeting_share_targets": {f"precision {p:g}, seed correlation {c:g}": smallest_gain_meeting_targets(cells, p, c)
                                                for p in precisions for c in correlations},
        "cells": cells,
        "command": f"python -m benchmarks.power --stream {stream} --out {out}"
                   + (f" --users {users}" if users else "") + f" --draws {draws} --seeds {seeds}"
                   + ("" if tuple(gains) == GAINS else "".join(f" --gain {g:g}" for g in gains))
                   + ("" if tuple(precisions) == PRECISIONS else "".join(f" --precision {p:g}" for p in precisions))
                   + ("" if tuple(correlations) == SEED_CORRELATIONS else "".join(f" --seed-correlation {c:g}" for c in correlations)),
        "seconds": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def main(
    stream: Annotated[Path, typer.Option(help="A per-user stream (benchmarks.stream format).")],
    out: Annotated[Path, typer.Option(help="Results file (JSON; the plot is written beside it).")],
    users: Annotated[Optional[int], typer.Option(help="A seeded subset of K eligible users, as benchmarks.personalize picks it (default: all).")] = None,
    base_model: Annotated[Optional[Path], typer.Option(help="A trained base model; default: trained on day 0.")] = None,
    draws: Annotated[int, typer.Option(help="Simulated measurements per cell.")] = 400,
    seeds: Annotated[int, typer.Option(help="Seeds a user's gain is averaged over (the benchmark's).")] = 3,
    gain: Annotated[Optional[list[float]], typer.Option(help=f"True per-user gains, macro-F1 points (repeatable; default {GAINS}).")] = None,
    precision: Annotated[Optional[list[float]], typer.Option(help=f"Shares of changed answers that are right, in (0.5, 1) (repeatable; default {PRECISIONS}); e.g. a row's answers_vs_base.changed_right.")] = None,
    seed_correlation: Annotated[Optional[list[float]], typer.Option(help=f"How alike the seeds' changes are, in [0, 1] (repeatable; default {SEED_CORRELATIONS}); e.g. a row's answers_vs_base.seed_correlation.")] = None,
) -> None:
    def fail(message: str) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if not stream.is_file():
        fail(f"stream file not found: {stream}")
    if draws < 10 or seeds < 1:
        fail("--draws must be at least 10 and --seeds at least 1")
    gains, precisions, correlations = tuple(gain or GAINS), tuple(precision or PRECISIONS), tuple(seed_correlation or SEED_CORRELATIONS)
    if not all(g > 0 for g in gains):
        fail("--gain must be above 0")
    if not all(0.5 < p < 1 for p in precisions):
        fail("--precision must be in (0.5, 1): a model whose changes are right half the time or less gains nothing")
    if not all(0 <= c <= 1 for c in correlations):
        fail("--seed-correlation must be in [0, 1]")
    result = run(stream, out, users, base_model, draws, seeds, gains, precisions, correlations)
    facts = result["test_sets"]
    print(f"{result['n_users']} users; test posts median {facts['test_posts_median']:g}, rarest label median "
          f"{facts['rarest_label_posts_median']:g} posts; base macro-F1 {facts['base_macro_f1_mean']:.2f}")
    for c in result["cells"]:
        print(f"  precision {c['precision']:.2f} seed corr {c['seed_correlation']:g} true gain {c['true_gain']:+5.1f}: measured {c['measured_gain_mean']:+6.2f}, "
              f"better {c['share_better']:.0%}, worse {c['share_worse']:.0%}, interval above 0 {c['p_interval_above_0']:.0%}, "
              f"capped users {c['capped_users']}")
    print("smallest true gain meeting >= 80% better and <= 5% worse:", result["smallest_gain_meeting_share_targets"])


if __name__ == "__main__":
    typer.run(main)
