"""Which per-user part earns its place? Chosen on feedback only, never on a test split.

    python -m benchmarks.personal_parts --stream FILE.jsonl --out RESULTS.json [--base-model DIR]

For every eligible user of a per-user stream (benchmarks.personalize's rule), each method is fitted
on the user's feedback of days 1 .. D-1 and scored (macro-F1, percent) on their day-D feedback, on
the frozen base model (the one benchmarks.personalize trains on day 0, unless --base-model):
- `prior k=K`: the user's label prior as a logit offset (PersonalKit.prior_adjustment, K pseudo-
  counts of the base prior): what every night folds into the user's head;
- `decision pen=P`: the prior moved by the decision offset (PersonalKit.decision_offset's search,
  by macro-F1 on the fit days' labels as the base scores them, P examples' worth of it per logit
  moved away from the prior): what a night serves with `decision_penalty` = P;
- `head lam=L`: a per-user linear head on the base's fused features, started at the base head plus
  the prior and fitted by L-BFGS with an L2 pull (L) of its weights towards the base's: the
  lowest-variance trained part a night could add.
The same is repeated fitted on days 1 .. K for every K < D (a user's first nights; the heads only
for K = D-1), still scored on day D (`by_fit_days`).
The gains are paired per user (method minus base), with a 95% bootstrap interval over users and
the shares of users better and worse. The test rows of the stream are never read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from tqdm import tqdm

from benchmarks.personalize import BenchConfig, Inputs, bootstrap_ci, eligible_users, train_base
from benchmarks.stream import read_stream
from nightowl.adapters.personal import PersonalKit, search_decision_offset
from nightowl.adapters.predictor import Predictor
from nightowl.adapters.train import scores
from nightowl.io import atomic_write_text
from nightowl.settings import Settings

PRIOR_STRENGTHS = (1.0, 5.0, 20.0, 100.0)
HEAD_L2 = (1e-3, 1e-2, 1e-1)
DECISION_PENALTIES = (0.0, 0.5, 1.0, 2.0, 4.0)
PRIOR_STRENGTH = 5.0  # UpdateConfig's default: the prior every decision offset starts from


@torch.inference_mode()
def base_outputs(predictor: Predictor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's logits and the fused features its head reads, for every row."""
    feats: list[torch.Tensor] = []
    hook = predictor.model.head.register_forward_hook(lambda m, i, o: feats.append(i[0].float().cpu()))
    items, logits = Inputs()(rows), []
    try:
        for start in tqdm(range(0, len(items), 64), desc="base model", unit="batch"):
            logits.append(predictor.model(**predictor.batcher(items[start : start + 64])).float().cpu())
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(feats)


def fit_head(feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float):
    """A user's head: the base's plus (dW, db), fitted by L-BFGS, dW pulled towards 0 by `l2`."""
    dw = torch.zeros_like(weight, requires_grad=True)
    db = torch.zeros_like(bias, requires_grad=True)
    opt = torch.optim.LBFGS([dw, db], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(feats @ (weight + dw).T + bias + db, y) + l2 * dw.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (weight + dw).detach(), (bias + db).detach()


def macro_f1(y: torch.Tensor, logits: torch.Tensor, n_labels: int) -> float:
    return 100 * scores(y.tolist(), logits.argmax(-1).tolist(), n_labels)["macro_f1"]


def run(stream_path: Path, out: Path, base_model: Path | None) -> dict:
    t0 = time.perf_counter()
    stream = read_stream(stream_path)
    cfg = BenchConfig(stream=stream_path, out=out, base_model=base_model)
    base_dir = train_base(stream, cfg)
    settings = Settings(labels=stream.labels, base_model_dir=base_dir, home=out.parent / "work-personal-parts")
    predictor = Predictor(settings, base_dir)
    kit = PersonalKit(predictor, images=None)
    users = eligible_users(stream, cfg)
    last = stream.days
    rows = [r for r in stream.rows if r.user_id in set(users) and r.split == "feedback" and r.day]
    logits, feats = base_outputs(predictor, rows)
    head = (predictor.model.head.weight.detach().float().cpu(), predictor.model.head.bias.detach().float().cpu())
    by_days = {}
    for fit_days in range(1, last):  # a user's first nights to all but the scored day
        gains, base_scores = user_gains(kit, stream, rows, logits, feats, head, users, fit_days, heads=fit_days == last - 1)
        by_days[str(fit_days)] = {"base_macro_f1_mean": round(float(np.mean(base_scores)), 3),
                                  "methods": {name: summary(values) for name, values in gains.items()}}
    result = {
        "benchmark": "personal_parts", "stream": str(stream_path), "labels": stream.labels, "base_model_dir": str(base_dir),
        "protocol": f"fit on each user's feedback of days 1-{last - 1}, scored on their day-{last} feedback (no test rows)",
        "n_users": len(users), **by_days[str(last - 1)],
        "by_fit_days": {k: {**v, "protocol": f"fit on days 1-{k}, scored on day {last}"} for k, v in by_days.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def user_gains(kit, stream, rows, logits, feats, head, users, fit_days: int, heads: bool) -> tuple[dict[str, list[float]], list[float]]:
    """Each method's gain over the base (macro-F1 points) per user, fitted on days 1 .. fit_days
    and scored on the last day; the per-user heads (slow) only when `heads`."""
    last, k = stream.days, len(stream.labels)
    gains: dict[str, list[float]] = {}
    base_scores = []
    for user in tqdm(users, desc=f"users, fit on days 1-{fit_days}", unit="user"):
        fit = [i for i, r in enumerate(rows) if r.user_id == user and r.day <= fit_days]
        held = [i for i, r in enumerate(rows) if r.user_id == user and r.day == last]
        y_fit = torch.tensor([stream.labels.index(rows[i].label) for i in fit])
        y_held = torch.tensor([stream.labels.index(rows[i].label) for i in held])
        base = macro_f1(y_held, logits[held], k)
        base_scores.append(base)

        def add(name: str, scored: torch.Tensor) -> None:
            gains.setdefault(name, []).append(macro_f1(y_held, scored, k) - base)

        fit_labels = [rows[i].label for i in fit]
        for s in PRIOR_STRENGTHS:
            add(f"prior k={s:g}", logits[held] + torch.tensor(kit.prior_adjustment(fit_labels, s)))
        prior = kit.prior_adjustment(fit_labels, PRIOR_STRENGTH)
        for pen in DECISION_PENALTIES:
            add(f"decision pen={pen:g}", logits[held] + torch.tensor(search_decision_offset(logits[fit], y_fit.tolist(), prior, "macro_f1", pen)))
        for lam in HEAD_L2 if heads else ():
            w, b = fit_head(feats[fit], y_fit, head[0], head[1] + torch.tensor(prior), lam)
            add(f"head lam={lam:g}", feats[held] @ w.T + b)
    return gains, base_scores


def summary(values: list[float]) -> dict:
    v = np.array(values)
    lo, hi = bootstrap_ci(v)
    return {"gain_mean": round(float(v.mean()), 3), "gain_ci95": [round(lo, 3), round(hi, 3)],
            "share_better": round(float(np.mean(v > 0)), 3), "share_worse": round(float(np.mean(v < 0)), 3)}


def main(
    stream: Annotated[Path, typer.Option(help="A per-user stream (benchmarks.stream format).")],
    out: Annotated[Path, typer.Option(help="Results file (JSON).")],
    base_model: Annotated[Optional[Path], typer.Option(help="A trained base model; default: trained on day 0.")] = None,
) -> None:
    result = run(stream, out, base_model)
    print(f"{result['n_users']} users; {result['protocol']}; base macro-F1 {result['base_macro_f1_mean']:.2f}")
    for days, part in result["by_fit_days"].items():
        print(f"{part['protocol']}: base macro-F1 {part['base_macro_f1_mean']:.2f}")
        for name, m in part["methods"].items():
            lo, hi = m["gain_ci95"]
            print(f"  {name:18s} gain {m['gain_mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]  better {m['share_better']:.0%}  worse {m['share_worse']:.0%}")


if __name__ == "__main__":
    typer.run(main)
