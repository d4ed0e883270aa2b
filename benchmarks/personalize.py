"""Does it personalize without forgetting? Day-by-day replay of a per-user stream through nightowl.

    python -m benchmarks.personalize --stream FILE.jsonl --out RESULTS.json [--users K] [--seed S]

For every row (variant) a fresh nightowl home is made on the embedded default. Each day's
feedback arrives through nightowl's own logging path (`logger.log_post` +
`log_feedback`), then the real nightly update runs (`nightowl.continual.night.run_night`). After every
night each user's current model is scored on their private test set and on every earlier day's
items (avalanche's Forgetting / BWT over that accuracy matrix).

Rows: base (the global model, no personalization); lora_no_replay; lora_random_replay;
nightowl (FAISS replay); joint_annotator_embedding (upper reference: one model trained on all
users' feedback at once, with a learned per-user embedding).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from avalanche.evaluation.metrics import BWT, Forgetting

from benchmarks.stream import Stream, StreamError, StreamRow, read_stream
from nightowl.adapters.config import FusionConfig
from nightowl.adapters.inputs import ModelInput
from nightowl.adapters.predictor import model_digest
from nightowl.adapters.train import TrainRecipe, scores, train_base_model
from nightowl.continual.night import run_night
from nightowl.day import logger
from nightowl.io import atomic_write_text
from nightowl.runtime import Runtime
from nightowl.settings import LimitSettings, Settings, UpdateConfig

ROWS = ("base", "lora_no_replay", "lora_random_replay", "nightowl", "joint_annotator_embedding")
COLORS = {"base": "tab:gray", "lora_no_replay": "tab:blue", "lora_random_replay": "tab:orange", "nightowl": "tab:red",
          "joint_annotator_embedding": "tab:purple"}  # one colour per row in every plot
REPLAY_OF_ROW = {"lora_no_replay": "none", "lora_random_replay": "random", "nightowl": "faiss"}
WORK = Path(__file__).resolve().parent / "work" / "personalize"


@dataclass
class BenchConfig:
    stream: Path
    out: Path
    users: int | None = 30  # a seeded subset (None: all)
    seed: int = 0
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    base_epochs: int = 3
    base_model: Path | None = None  # a trained base to use instead of training one on day 0
    joint_epochs: int = 2
    update_epochs: int = UpdateConfig.model_fields["epochs"].default
    jobs: int = 1  # rows run in this many processes (the CPU's threads are split between them)
    work: Path = WORK


# -- inputs and scores -------------------------------------------------------------------------

class Inputs:
    """Stream rows as model inputs; image features computed once per file."""

    def __init__(self) -> None:
        self._encoder = None
        self._features: dict[str, torch.Tensor] = {}

    def __call__(self, rows: list[StreamRow]) -> list[ModelInput]:
        return [ModelInput(r.text, r.aspect, r.context, self._image(r.image)) for r in rows]

    def _image(self, path: str | None) -> torch.Tensor | None:
        if not path:
            return None
        if path not in self._features:
            from PIL import Image

            from nightowl.adapters.encoders import ImageEncoder

            self._encoder = self._encoder or ImageEncoder()
            with Image.open(path) as im:
                self._features[path] = self._encoder.encode(im)
        return self._features[path]


def score(pred_labels: list[str], rows: list[StreamRow], labels: list[str]) -> dict:
    s = scores([labels.index(r.label) for r in rows], [labels.index(p) for p in pred_labels], len(labels))
    return {"accuracy": 100 * s["accuracy"], "macro_f1": 100 * s["macro_f1"], "n": s["n"]}  # percent, as reported


def read_image(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


# -- the shared base model and global replay data ----------------------------------------------

def train_base(stream: Stream, cfg: BenchConfig) -> Path:
    """The global model: the stream's day-0 rows (no user information), cached by content."""
    if cfg.base_model:
        return cfg.base_model
    if not stream.base:
        raise StreamError("the stream has no day-0 rows to train a base model on: pass --base-model DIR")
    key = hashlib.sha256(json.dumps([[r.text, r.context, r.aspect, r.label] for r in stream.base]).encode())
    key.update(f"{stream.labels}/{cfg.base_epochs}/{cfg.seed}".encode())
    out = cfg.work / f"base-{key.hexdigest()[:12]}"
    if (out / "nightowl_config.json").exists():
        return out
    rows = stream.base[:]
    random.Random(cfg.seed).shuffle(rows)
    cut = max(1, len(rows) // 10)  # a 10% slice of day 0 picks the epoch
    inputs = Inputs()
    items = [(i, stream.labels.index(r.label)) for i, r in zip(inputs(rows), rows)]
    config = FusionConfig(labels=stream.labels)
    config.training = {"dataset": str(stream.header.get("stream", cfg.stream.name)), "data": "day-0 rows of the stream",
                       "selection": f"10% slice of day 0 ({cut} rows)"}
    print(f"base model: {len(rows) - cut} day-0 rows, {cfg.base_epochs} epochs", flush=True)
    train_base_model(items[cut:], items[:cut], config, out, TrainRecipe(epochs=cfg.base_epochs, seed=cfg.seed))
    return out


def write_global_replay(stream: Stream, cfg: BenchConfig, n: int = 300) -> Path | None:
    """A sample of day 0 for the global replay memory (JSONL, as settings.global_replay_data reads)."""
    if not stream.base:
        return None
    rows = random.Random(cfg.seed).sample(stream.base, min(n, len(stream.base)))
    path = cfg.work / f"global-{cfg.seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps({"text": r.text, "context": r.context, "aspect": r.aspect, "label": r.label}) + "\n" for r in rows))
    return path


# -- rows ----------------------------------------------------------------------------------------

def _forgetting(acc: dict[int, dict[int, float]], last: int) -> tuple[float | None, float | None]:
    """avalanche's Forgetting and BWT over days 1..last-1: accuracy just after the night that
    learned a day vs after the last night."""
    f, b = Forgetting(), BWT()
    acc = {int(d): {int(n): a for n, a in by_night.items()} for d, by_night in acc.items()}  # JSON keys are strings
    for day, by_night in acc.items():
        if day >= last:
            continue  # the last day has no later night to forget it in
        for m in (f, b):
            m.update(day, by_night[day], initial=True)
            m.update(day, by_night[last])
    fr, br = f.result(), b.result()
    return (statistics.fmean(fr.values()) if fr else None, statistics.fmean(br.values()) if br else None)


def run_base(stream: Stream, users: list[str], base_dir: Path, cfg: BenchConfig) -> dict:
    from nightowl.adapters.predictor import Predictor

    settings = Settings(home=cfg.work / "homes" / "base", rationale_provider="none", labels=stream.labels, base_model_dir=base_dir)
    predictor, inputs = Predictor(settings), Inputs()

    def predict(rows):
        return [p.label for p in predictor.predict_inputs(inputs(rows))]

    test = {u: score(predict(stream.test(u)), stream.test(u), stream.labels) for u in users}
    days = {u: {d: score(predict(stream.feedback(u, d)), stream.feedback(u, d), stream.labels)["accuracy"]
                for d in range(1, stream.days + 1)} for u in users}
    per_night = [{"night": n, "per_user": test} for n in range(1, stream.days + 1)]
    acc = {u: {d: {n: a for n in range(1, stream.days + 1)} for d, a in days[u].items()} for u in users}
    return {"per_night": per_night, "acc": acc, "seconds": []}


def run_variant(name: str, stream: Stream, users: list[str], base_dir: Path, global_replay: Path | None, cfg: BenchConfig) -> dict:
    """One LoRA row: a fresh home; each day's feedback through the logging path; a real night."""
    home = cfg.work / "homes" / f"{name}-{cfg.seed}"
    if home.exists():
        import shutil

        shutil.rmtree(home)
    # Real streams hold long posts (MultiPICo has 4,677-character contexts): the serving limit
    # is a policy for live traffic, so a benchmark home takes the stream as it is.
    longest = max(len(x or "") for r in stream.rows for x in (r.text, r.context, r.aspect))
    limits = LimitSettings(max_text_chars=max(LimitSettings().max_text_chars, longest))
    settings = Settings(home=home, rationale_provider="none", labels=stream.labels, base_model_dir=base_dir,
                        global_replay_data=global_replay, limits=limits)
    rt = Runtime(settings)
    rt.update_config = UpdateConfig(epochs=cfg.update_epochs, replay=REPLAY_OF_ROW[name])
    inputs = Inputs()
    for u in users:
        logger.create_user(rt, u)
    per_night, acc, seconds = [], {u: {} for u in users}, []
    try:
        for night in range(1, stream.days + 1):
            for u in users:
                for i, r in enumerate(stream.feedback(u, night)):
                    post = logger.log_post(rt, u, r.text, aspect=r.aspect, image=read_image(r.image),
                                                 context=r.context, idempotency_key=f"p{night}-{i}")
                    logger.log_feedback(rt, u, post.post_id, r.label, None, f"f{night}-{i}")
            t0 = time.perf_counter()
            summary = run_night(rt)
            night_s = time.perf_counter() - t0
            seconds += [res.seconds for res in summary.results]

            def predict(u, rows):
                return [p.label for p in rt.predictor.predict_inputs(inputs(rows), rt.active_adapter(u))]

            test = {u: score(predict(u, stream.test(u)), stream.test(u), stream.labels) for u in users}
            for u in users:
                for day in range(1, night + 1):
                    rows = stream.feedback(u, day)
                    acc[u].setdefault(day, {})[night] = score(predict(u, rows), rows, stream.labels)["accuracy"]
            per_night.append({
                "night": night, "per_user": test, "statuses": summary.counts(), "night_seconds": round(night_s, 1),
                "seconds_per_user_median": round(statistics.median([r.seconds for r in summary.results]), 2) if summary.results else 0.0,
            })
            print(f"{name} night {night}: F1 {statistics.fmean(t['macro_f1'] for t in test.values()):.2f} "
                  f"{summary.counts()} {night_s:.0f}s", flush=True)
    finally:
        rt.close()
    return {"per_night": per_night, "acc": acc, "seconds": seconds}


def run_joint(stream: Stream, users: list[str], base_dir: Path, cfg: BenchConfig) -> dict:
    from benchmarks.joint import predict_joint, train_joint

    inputs = Inputs()
    index = {u: i + 1 for i, u in enumerate(users)}
    examples = []
    for u in users:
        rows = [r for d in range(1, stream.days + 1) for r in stream.feedback(u, d)]
        examples += [(x, stream.labels.index(r.label), index[u]) for x, r in zip(inputs(rows), rows)]
    t0 = time.perf_counter()
    model, batcher, report = train_joint(base_dir, examples, len(users), epochs=cfg.joint_epochs, seed=cfg.seed)
    train_s = time.perf_counter() - t0

    def predict(u, rows):
        return [stream.labels[i] for i in predict_joint(model, batcher, inputs(rows), index[u])]

    test = {u: score(predict(u, stream.test(u)), stream.test(u), stream.labels) for u in users}
    # Trained once on every day together: there is no "after night d" to forget from.
    return {"per_night": [{"night": stream.days, "per_user": test, "train_seconds": round(train_s, 1),
                           "note": "trained once on all days' feedback of all users"}],
            "acc": None, "seconds": [], "training": report}


def _row_cache(name: str, users: list[str], base_dir: Path, cfg: BenchConfig) -> Path:
    """Keyed by everything a row's numbers depend on: the stream, the users, the base model's
    files (not just its folder name) and the nightly update's settings."""
    update = UpdateConfig(epochs=cfg.update_epochs).model_dump()
    key = hashlib.sha256(json.dumps([name, users, model_digest(base_dir), update, cfg.seed, cfg.joint_epochs,
                                     hashlib.sha256(Path(cfg.stream).read_bytes()).hexdigest()]).encode())
    return cfg.work / "rows" / f"{name}-{key.hexdigest()[:12]}.json"


def run_row(name: str, stream_path: Path, users: list[str], base_dir: Path, global_replay: Path | None, cfg: BenchConfig, threads: int) -> tuple[str, dict]:
    cache = _row_cache(name, users, base_dir, cfg)
    if cache.exists():  # finished by an earlier, interrupted run of the same configuration
        return name, {**json.loads(cache.read_text()), "from_cache": True}
    torch.set_num_threads(threads)
    stream = read_stream(stream_path)
    t0 = time.perf_counter()
    if name == "base":
        out = run_base(stream, users, base_dir, cfg)
    elif name == "joint_annotator_embedding":
        out = run_joint(stream, users, base_dir, cfg)
    else:
        out = run_variant(name, stream, users, base_dir, global_replay, cfg)
    out["row_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = json.loads(json.dumps(out))  # as the cache will give it back (int keys become strings)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(out))
    return name, out


# -- summary and plots -------------------------------------------------------------------------

def summarize(name: str, raw: dict, base_test: dict[str, dict], users: list[str], last: int) -> dict:
    nights = []
    for entry in raw["per_night"]:
        per_user = entry["per_user"]
        gains = [per_user[u]["macro_f1"] - base_test[u]["macro_f1"] for u in users]
        nights.append({
            "night": entry["night"],
            "macro_f1_mean": round(statistics.fmean(per_user[u]["macro_f1"] for u in users), 2),
            "accuracy_mean": round(statistics.fmean(per_user[u]["accuracy"] for u in users), 2),
            "gain_vs_base_mean": round(statistics.fmean(gains), 2),
            "share_users_gained": round(sum(g > 0 for g in gains) / len(users), 3),
            **{k: v for k, v in entry.items() if k not in ("night", "per_user")},
        })
    final = raw["per_night"][-1]["per_user"]
    forgetting = bwt = None
    if raw["acc"] is not None:
        pairs = [_forgetting(raw["acc"][u], last) for u in users]
        f = [p[0] for p in pairs if p[0] is not None]
        b = [p[1] for p in pairs if p[1] is not None]
        forgetting = round(statistics.fmean(f), 2) if f else None
        bwt = round(statistics.fmean(b), 2) if b else None
    return {
        "name": name,
        "macro_f1_mean": nights[-1]["macro_f1_mean"],
        "accuracy_mean": nights[-1]["accuracy_mean"],
        "gain_vs_base_mean": nights[-1]["gain_vs_base_mean"],
        "share_users_gained": nights[-1]["share_users_gained"],
        "forgetting_mean": forgetting,
        "bwt_mean": bwt,
        "nightly_seconds_per_user_median": round(statistics.median(raw["seconds"]), 2) if raw["seconds"] else None,
        "row_seconds": raw.get("row_seconds"),  # the row's own run, also when this file took it from the cache
        "from_cache": raw.get("from_cache", False),
        "per_night": nights,
        "per_user_final": {u: {k: round(v, 2) for k, v in final[u].items()} for u in users},
        "per_user_macro_f1_by_night": {u: [round(e["per_user"][u]["macro_f1"], 2) for e in raw["per_night"]] for u in users},
    }


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = {r["name"]: r for r in result["rows"]}
    base = rows.get("base")
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if "nightowl" in rows and base:
        for u, curve in rows["nightowl"]["per_user_macro_f1_by_night"].items():
            start = base["per_user_final"][u]["macro_f1"]
            ax.plot(range(0, len(curve) + 1), [start] + curve, color=COLORS["nightowl"], alpha=0.15, lw=1)
    for name, row in rows.items():
        xs = [e["night"] for e in row["per_night"]]
        ys = [e["macro_f1_mean"] for e in row["per_night"]]
        if base and name != "base" and len(xs) > 1:
            xs, ys = [0] + xs, [base["macro_f1_mean"]] + ys
        ax.plot(xs, ys, marker="o", lw=2.5 if name == "nightowl" else 1.5, color=COLORS[name], label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # nights are whole
    ax.set_xlabel("night (0 = base model)")
    ax.set_ylabel("macro-F1 on the user's private test set")
    ax.set_title("Per-user learning curves (thin: nightowl, each user; thick: row means)")
    written.append(_save(fig, out, "curves"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if base:
        gains = {name: [rows[name]["per_user_final"][u]["macro_f1"] - base["per_user_final"][u]["macro_f1"] for u in result["users"]]
                 for name in ("lora_no_replay", "lora_random_replay", "nightowl", "joint_annotator_embedding") if name in rows}
        if gains:  # shared bins and outlines: overlapping filled bars of four rows are unreadable
            edges = np.histogram_bin_edges([g for gs in gains.values() for g in gs], bins=20)
            for name, gs in gains.items():
                ax.hist(gs, bins=edges, histtype="step", lw=2.5 if name == "nightowl" else 1.5, color=COLORS[name], label=name)
        ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("macro-F1 gain over the base model after the last night (points)")
    ax.set_ylabel("users")
    ax.set_title("Gain per user")
    written.append(_save(fig, out, "gains"))
    return written


def _save(fig, out: Path, what: str) -> str:
    import matplotlib.pyplot as plt

    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(f"{out.stem}-{what}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


# -- the command ---------------------------------------------------------------------------------

def pick_users(stream: Stream, k: int | None, seed: int) -> list[str]:
    users = stream.users()
    if not users:
        raise StreamError("the stream has no user with both feedback (day >= 1) and test rows")
    if k is None or k >= len(users):
        return users
    return sorted(random.Random(seed).sample(users, k))


def run(cfg: BenchConfig) -> dict:
    unknown = set(cfg.rows) - set(ROWS)
    if unknown:
        raise StreamError(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    started = time.perf_counter()
    stream = read_stream(cfg.stream)
    if stream.days < 1:
        raise StreamError("the stream has no feedback days (day >= 1)")
    users = pick_users(stream, cfg.users, cfg.seed)
    cfg.work.mkdir(parents=True, exist_ok=True)
    base_dir = train_base(stream, cfg)
    global_replay = write_global_replay(stream, cfg)
    names = ["base"] + [r for r in cfg.rows if r != "base"]  # every gain is measured against the base
    print(f"personalize: {len(users)} users, {stream.days} nights, rows {names}, {cfg.jobs} process(es)", flush=True)

    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.jobs))
    # longest rows first, so parallel processes finish together; results keep the canonical order
    cost = {"nightowl": 0, "lora_random_replay": 1, "lora_no_replay": 2, "joint_annotator_embedding": 3, "base": 4}
    args = [(n, cfg.stream, users, base_dir, global_replay, cfg, threads) for n in sorted(names, key=cost.get)]
    if cfg.jobs > 1:
        with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
            raw = dict(pool.map(run_row, *zip(*args)))
    else:
        raw = dict(run_row(*a) for a in args)

    base_test = raw["base"]["per_night"][-1]["per_user"]
    rows = [summarize(n, raw[n], base_test, users, stream.days) for n in ROWS if n in raw]
    result = {
        "benchmark": "personalize",
        "stream": str(cfg.stream),
        "stream_header": stream.header,
        "command": (f"python -m benchmarks.personalize --stream {cfg.stream} --out {cfg.out} --users {cfg.users or 0} "
                    f"--seed {cfg.seed} --update-epochs {cfg.update_epochs} --jobs {cfg.jobs}"),
        "users": users,
        "n_users": len(users),
        "nights": stream.days,
        "labels": stream.labels,
        "test_rows_per_user_median": statistics.median(len(stream.test(u)) for u in users),
        "feedback_rows_per_user_median": statistics.median(sum(len(stream.feedback(u, d)) for d in range(1, stream.days + 1)) for u in users),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "update_config": UpdateConfig(epochs=cfg.update_epochs).model_dump(),
        "base_model_dir": str(base_dir),
        "metrics": "macro-F1/accuracy in percent on each user's private test set; gains in macro-F1 points vs the base "
                   "model; forgetting/BWT (avalanche) in accuracy points over each day's feedback items, from the "
                   "night that learned them to the last night",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, cfg.out)
    atomic_write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def personalize(
    stream: Annotated[Path, typer.Option(help="A personalization stream (JSONL; see benchmarks/stream.py).")],
    out: Annotated[Path, typer.Option(help="Results JSON (plots are written beside it).")],
    users: Annotated[Optional[int], typer.Option(help="A seeded subset of K users (default 30; 0 = all).")] = 30,
    seed: int = 0,
    rows: Annotated[Optional[list[str]], typer.Option("--row", help="Rows to run (repeatable; base always runs).")] = None,
    base_model: Annotated[Optional[Path], typer.Option(help="Use this base model instead of training one on day 0.")] = None,
    base_epochs: int = 3,
    update_epochs: Annotated[int, typer.Option(help="Epochs of each nightly LoRA update.")] = 6,
    joint_epochs: int = 2,
    jobs: Annotated[int, typer.Option(help="Rows run in this many processes.")] = 1,
    work: Annotated[Optional[Path], typer.Option(help="Scratch folder (homes, cached base model).")] = None,
) -> None:
    """Day-by-day personalization benchmark: feedback through the logging path, real nights, per-user scores."""
    if not stream.is_file():
        _fail(f"stream file not found: {stream}")
    if jobs < 1 or update_epochs < 1 or base_epochs < 1 or joint_epochs < 1:
        _fail("--jobs and the epoch counts must be at least 1")
    cfg = BenchConfig(stream=stream, out=out, users=users or None, seed=seed, rows=rows or list(ROWS),
                      base_model=base_model, base_epochs=base_epochs, update_epochs=update_epochs,
                      joint_epochs=joint_epochs, jobs=jobs, work=work or WORK)
    try:
        result = run(cfg)
    except StreamError as exc:
        _fail(str(exc))
    keys = ("name", "macro_f1_mean", "accuracy_mean", "gain_vs_base_mean", "share_users_gained", "forgetting_mean", "bwt_mean")
    typer.echo(json.dumps({"out": str(out), "users": result["n_users"], "rows": [{k: r[k] for k in keys} for r in result["rows"]]}, indent=2))


if __name__ == "__main__":
    app()
