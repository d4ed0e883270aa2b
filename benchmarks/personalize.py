"""Does it personalize without forgetting? Day-by-day replay of per-user streams through nightowl.

    python -m benchmarks.personalize --stream FILE.jsonl --out RESULTS.json [--seed 0 --seed 1 --seed 2] \
        [--protocol labelled --protocol realistic] [--p-correct 1.0 --p-correct 0.3]

For every (protocol, seed, row) a fresh nightowl home is made on the embedded default. Each day's
posts go through nightowl's own logging path (`logger.log_post`, which answers each post with the
model the last night promoted, then `log_feedback`), then the real nightly update runs
(`nightowl.continual.night.run_night`). After every night each user's current model is scored on
their private test set and on every earlier day's items (avalanche's Forgetting / BWT).

Protocols (who gives feedback on what):
- `labelled`: every post of the day gets the user's label;
- `realistic`: the user reads the answer; a wrong one is corrected with probability `p_correct`,
  a right one confirmed with probability `p_confirm`; every other answer is left standing
  (unlabelled; the night's label prior "trusts silence" on those).

Users: every user of the stream with at least `min_feedback` feedback rows and `min_test` test
rows (MultiPICo-EN: 72 of 74 annotators). Seeds: seed 0 keeps the stream's order; seed s > 0
re-deals each user's feedback into days of the same sizes in a shuffled order (the nights'
training randomness differs in every run). Gains are paired (row minus base, per user), averaged
over seeds per user, with a 95% bootstrap interval over users.

Rows: `base` (the global model), `nightowl` (the product's default update settings, exactly),
and ablations that each change one default (`ROWS`); `joint_annotator_embedding` is the upper
reference (one model trained on all users' feedback at once, with a learned per-user embedding;
labelled protocol only).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Annotated, Iterator, Optional

import numpy as np
import torch
import typer
from avalanche.evaluation.metrics import BWT, Forgetting
from tqdm import tqdm

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


@dataclass(frozen=True)
class Row:
    """One row of the table: how users' models are made. `update` changes these fields of the
    product's default `UpdateConfig` (empty: the defaults, exactly)."""

    kind: str  # "base" | "nightly" | "joint"
    update: dict = field(default_factory=dict)
    about: str = ""
    # The local generator's rationale on every feedback post, stored before the night as the
    # server's worker does by day (benchmarks/rationales.py); False: rationale_provider "none".
    rationales: bool = False

    def update_config(self) -> UpdateConfig:
        return UpdateConfig(**self.update)


ROWS: dict[str, Row] = {
    "base": Row("base", about="the global model for everyone (no personalization)"),
    "nightowl": Row("nightly", about="the product's default nightly update, unchanged (no rationales)"),
    "nightowl_rationales": Row("nightly", about="the default nightly update, with the local generator's (SmolLM2) rationale stored on every feedback post", rationales=True),
    "lora_no_replay": Row("nightly", {"replay": "none"}, "defaults without replay"),
    "lora_random_replay": Row("nightly", {"replay": "random"}, "defaults, replay drawn at random instead of by FAISS"),
    "nightowl_no_prior": Row("nightly", {"prior_strength": 0.0}, "defaults without the user's label-prior correction"),
    "nightowl_global_replay": Row("nightly", {"n_global": 16}, "defaults plus 16 global (base-data) examples in each night's replay"),
    "nightowl_no_standing": Row("nightly", {"standing_ratio": 0.0}, "defaults, answers let stand neither trained on nor gated on"),
    "nightowl_tie_gate": Row("nightly", {"gate_evidence_z": 0.0}, "defaults, the gate promotes on 'not worse' without evidence against the base"),
    "nightowl_decision_offset": Row("nightly", {"decision_offset": True}, "defaults plus the decision offset (the served offset moved from the prior to where the base scores best by the gate's metric)"),
    "nightowl_no_prior_fallback": Row("nightly", {"fallback_to_prior": False}, "defaults, a trained candidate the gate turns down takes the night's prior with it"),
    "nightowl_prior_only": Row("nightly", {"train_adapter": False}, "defaults without the LoRA: each night re-fits only the user's label prior (base model plus the prior's offset), judged by folds over all the user's labels"),
    "nightowl_offsets_only": Row("nightly", {"train_adapter": False, "decision_offset": True}, "defaults without the LoRA, with the decision offset: base model plus the user's offset for gate_metric, judged by folds over all the user's labels"),
    "nightowl_folds_fallback": Row("nightly", {"fallback_by_folds": True}, "defaults, the fallback of a user on the base is the base plus the night's offsets judged by folds"),
    "nightowl_trust_silence": Row("nightly", {"doubt_silence": False}, "defaults, the gate counts an answer let stand as the user's label (the default before doubt_silence)"),
    "nightowl_shrink": Row("nightly", {"adapter_scales": [0.0, 0.25, 0.5, 0.75, 1.0]}, "defaults, each night's trained change to the base scaled by the best of 0, 1/4, 1/2, 3/4, 1 on the held-back posts (the smallest of the best)"),
    "nightowl_offsets_holdout": Row("nightly", {"train_adapter": False, "decision_offset": True, "gate_folds": 0}, "nightowl_offsets_only judged on the held-back posts instead of by folds"),
    "joint_annotator_embedding": Row("joint", about="upper reference: one model for all users, a learned embedding per user"),
}
DEFAULT_ROWS = ["base", "nightowl", "lora_no_replay"]
COLORS = {"base": "tab:gray", "lora_no_replay": "tab:blue", "lora_random_replay": "tab:orange", "nightowl": "tab:red",
          "nightowl_no_prior": "tab:green", "nightowl_global_replay": "tab:brown",
          "nightowl_no_standing": "tab:olive", "nightowl_tie_gate": "tab:pink", "nightowl_no_prior_fallback": "tab:cyan", "nightowl_decision_offset": "gold",
          "nightowl_prior_only": "tab:green", "nightowl_offsets_only": "goldenrod", "nightowl_offsets_holdout": "darkkhaki", "nightowl_folds_fallback": "indigo", "nightowl_trust_silence": "teal", "nightowl_rationales": "darkgreen", "nightowl_shrink": "crimson",
          "joint_annotator_embedding": "tab:purple"}  # one colour per row in every plot
WORK = Path(__file__).resolve().parent / "work" / "personalize"


@dataclass(frozen=True)
class Protocol:
    """Who labels what: `labelled` (every post) or `realistic` (corrections of wrong answers with
    probability p_correct, confirmations of right ones with probability p_confirm)."""

    name: str
    p_correct: float = 1.0
    p_confirm: float = 0.0

    @property
    def key(self) -> str:
        return self.name if self.name == "labelled" else f"realistic_p{self.p_correct:g}"

    def feedback(self, served: str, truth: str, rng: random.Random) -> str | None:
        """The label the user gives for a post answered `served` whose true label (for them) is
        `truth`; None: they give none and the answer stands."""
        if self.name == "labelled":
            return truth
        if served != truth:
            return truth if rng.random() < self.p_correct else None
        return truth if rng.random() < self.p_confirm else None


@dataclass
class BenchConfig:
    stream: Path
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    protocols: list[Protocol] = field(default_factory=lambda: [Protocol("labelled"), Protocol("realistic", 1.0, 0.05),
                                                               Protocol("realistic", 0.3, 0.05)])
    min_feedback: int = 100  # a user needs this many feedback rows (all days) ...
    min_test: int = 20  # ... and this many test rows to be in the benchmark
    users: int | None = None  # a seeded subset of the eligible users (None: all)
    base_epochs: int = 3
    base_seed: int = 0  # the base model's training seed (one base for every run)
    base_model: Path | None = None  # a trained base to use instead of training one on day 0
    joint_epochs: int = 2
    jobs: int = 1  # runs in this many processes (the CPU's threads are split between them)
    bootstrap: int = 4000
    work: Path = WORK
    rationales: Path | None = None  # the rationale file of rows with rationales (set by `run`)
    code: str = field(default_factory=lambda: code_digest())  # finished runs are reused by the same code only


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
    """Scores in percent, as reported, and the answers themselves (so a row's answers can be
    compared with the base's post by post: `answer_stats`)."""
    s = scores([labels.index(r.label) for r in rows], [labels.index(p) for p in pred_labels], len(labels))
    return {"accuracy": 100 * s["accuracy"], "macro_f1": 100 * s["macro_f1"], "n": s["n"], "answers": list(pred_labels)}


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
    key.update(f"{stream.labels}/{cfg.base_epochs}/{cfg.base_seed}".encode())
    out = cfg.work / f"base-{key.hexdigest()[:12]}"
    if (out / "nightowl_config.json").exists():
        return out
    rows = stream.base[:]
    random.Random(cfg.base_seed).shuffle(rows)
    cut = max(1, len(rows) // 10)  # a 10% slice of day 0 picks the epoch
    inputs = Inputs()
    items = [(i, stream.labels.index(r.label)) for i, r in zip(inputs(rows), rows)]
    config = FusionConfig(labels=stream.labels)
    config.training = {"dataset": str(stream.header.get("stream", cfg.stream.name)), "data": "day-0 rows of the stream",
                       "selection": f"10% slice of day 0 ({cut} rows)"}
    print(f"base model: {len(rows) - cut} day-0 rows, {cfg.base_epochs} epochs", flush=True)
    train_base_model(items[cut:], items[:cut], config, out, TrainRecipe(epochs=cfg.base_epochs, seed=cfg.base_seed))
    return out


def write_global_replay(stream: Stream, cfg: BenchConfig, n: int = 300) -> Path | None:
    """A sample of day 0 for the global replay memory (JSONL, as settings.global_replay_data reads)."""
    if not stream.base:
        return None
    rows = random.Random(cfg.base_seed).sample(stream.base, min(n, len(stream.base)))
    path = cfg.work / f"global-{cfg.base_seed}.jsonl"
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


def eligible_users(stream: Stream, cfg: BenchConfig) -> list[str]:
    """Users with enough data to score (the rule is in the results file), or a seeded subset."""
    users = [u for u in stream.users()
             if sum(len(stream.feedback(u, d)) for d in range(1, stream.days + 1)) >= cfg.min_feedback
             and len(stream.test(u)) >= cfg.min_test]
    if not users:
        raise StreamError(f"no user has >= {cfg.min_feedback} feedback rows and >= {cfg.min_test} test rows "
                          "(lower --min-feedback / --min-test)")
    if cfg.users is None or cfg.users >= len(users):
        return users
    return sorted(random.Random(0).sample(users, cfg.users))


def users_rule(cfg: BenchConfig) -> str:
    """`eligible_users`' rule in words (results files state it)."""
    return (f"users with >= {cfg.min_feedback} feedback rows and >= {cfg.min_test} test rows"
            + (f", a seeded subset of {cfg.users}" if cfg.users else ""))


def days_for(stream: Stream, user: str, seed: int) -> dict[int, list[StreamRow]]:
    """The user's feedback by day: the stream's order for seed 0; other seeds re-deal the same
    rows into days of the same sizes in a shuffled order."""
    by_day = {d: stream.feedback(user, d) for d in range(1, stream.days + 1)}
    if seed == 0:
        return by_day
    rows = [r for d in sorted(by_day) for r in by_day[d]]
    random.Random(f"{seed}/{user}").shuffle(rows)
    out, at = {}, 0
    for d in sorted(by_day):
        out[d], at = rows[at : at + len(by_day[d])], at + len(by_day[d])
    return out


def run_base(stream: Stream, users: list[str], base_dir: Path, cfg: BenchConfig, seed: int) -> dict:
    from nightowl.adapters.predictor import Predictor

    settings = Settings(home=cfg.work / "homes" / "base", rationale_provider="none", labels=stream.labels, base_model_dir=base_dir)
    predictor, inputs = Predictor(settings), Inputs()

    def predict(rows):
        return [p.label for p in predictor.predict_inputs(inputs(rows))]

    test = {u: score(predict(stream.test(u)), stream.test(u), stream.labels) for u in users}
    days = {u: days_for(stream, u, seed) for u in users}
    day_acc = {u: {d: score(predict(rows), rows, stream.labels)["accuracy"] for d, rows in days[u].items()} for u in users}
    per_night = [{"night": n, "per_user": test} for n in range(1, stream.days + 1)]
    acc = {u: {d: {n: a for n in range(1, stream.days + 1)} for d, a in day_acc[u].items()} for u in users}
    return {"per_night": per_night, "acc": acc, "seconds": []}


def run_nightly(name: str, protocol: Protocol, seed: int, stream: Stream, users: list[str], base_dir: Path,
                global_replay: Path | None, cfg: BenchConfig, position: int = 0) -> dict:
    """One nightly row: a fresh home; each day's posts answered by the user's current model and
    fed back as the protocol says, through the logging path; then a real night."""
    home = cfg.work / "homes" / f"{protocol.key}-{seed}-{name}"
    if home.exists():
        import shutil

        shutil.rmtree(home)
    # Real streams hold long posts (MultiPICo has 4,677-character contexts): the serving limit
    # is a policy for live traffic, so a benchmark home takes the stream as it is.
    longest = max(len(x or "") for r in stream.rows for x in (r.text, r.context, r.aspect))
    limits = LimitSettings(max_text_chars=max(LimitSettings().max_text_chars, longest))
    with_rationales = ROWS[name].rationales
    settings = Settings(home=home, rationale_provider="cache" if with_rationales else "none", labels=stream.labels,
                        base_model_dir=base_dir, global_replay_data=global_replay, limits=limits)
    rt = Runtime(settings)
    rt.update_config = ROWS[name].update_config()
    worker = _rationale_worker(rt, cfg) if with_rationales else None
    inputs, rng = Inputs(), random.Random(f"feedback/{protocol.key}/{seed}")
    days = {u: days_for(stream, u, seed) for u in users}
    for u in users:
        logger.create_user(rt, u)
    per_night, acc, seconds = [], {u: {} for u in users}, []
    bar = tqdm(total=stream.days * len(users), desc=f"{protocol.key} seed {seed} {name}", unit="user-night",
               position=position, leave=True, mininterval=5)
    try:
        for night in range(1, stream.days + 1):
            served = {u: [0, 0, 0] for u in users}  # answers served, right, labels given
            for u in users:
                for i, r in enumerate(days[u][night]):
                    post = logger.log_post(rt, u, r.text, aspect=r.aspect, image=read_image(r.image),
                                           context=r.context, idempotency_key=f"p{night}-{i}")
                    label = protocol.feedback(post.prediction.label, r.label, rng)
                    served[u][0] += 1
                    served[u][1] += post.prediction.label == r.label
                    if label is not None:
                        logger.log_feedback(rt, u, post.post_id, label, None, f"f{night}-{i}")
                        served[u][2] += 1
            rationales = worker.run_once() if worker else None  # the day's, as the server's worker writes them
            t0 = time.perf_counter()
            summary = run_night(rt)
            night_s = time.perf_counter() - t0
            seconds += [res.seconds for res in summary.results if res.seconds]
            bar.update(len(users))

            def predict(u, rows):
                return [p.label for p in rt.predictor.predict_inputs(inputs(rows), rt.active_adapter(u))]

            test = {u: score(predict(u, stream.test(u)), stream.test(u), stream.labels) for u in users}
            # Forgetting compares a day's accuracy right after the night that learned it with
            # the last night's: those are the only entries of the matrix it reads.
            for u in users:
                for day in range(1, night + 1) if night == stream.days else [night]:
                    rows = days[u][day]
                    acc[u].setdefault(day, {})[night] = score(predict(u, rows), rows, stream.labels)["accuracy"]
            per_night.append({
                "night": night, "per_user": test, "statuses": summary.counts(), "night_seconds": round(night_s, 1),
                "served": {u: {"answers": v[0], "right": v[1], "labels_given": v[2]} for u, v in served.items()},
                **({"rationales_stored": rationales} if worker else {}),
            })
    finally:
        bar.close()
        rt.close()
    return {"per_night": per_night, "acc": acc, "seconds": seconds}


def _rationale_worker(rt: Runtime, cfg: BenchConfig):
    """The product's rationale worker over a cache holding the local generator's rationales
    (written once, `benchmarks/rationales.py`); one pass stores every post that is due."""
    from nightowl.day.rationale_worker import RationaleWorker
    from nightowl.rationales import RationaleCache

    if cfg.rationales is None:
        raise StreamError("a row with rationales needs the rationale file (run() writes it)")
    RationaleCache(rt.settings.rationale_cache_dir).import_jsonl(cfg.rationales)
    return RationaleWorker(rt, batch=1_000_000)


def run_joint(stream: Stream, users: list[str], base_dir: Path, cfg: BenchConfig, seed: int) -> dict:
    from benchmarks.joint import predict_joint, train_joint

    inputs = Inputs()
    index = {u: i + 1 for i, u in enumerate(users)}
    examples = []
    for u in users:
        rows = [r for d in range(1, stream.days + 1) for r in stream.feedback(u, d)]
        examples += [(x, stream.labels.index(r.label), index[u]) for x, r in zip(inputs(rows), rows)]
    t0 = time.perf_counter()
    model, batcher, report = train_joint(base_dir, examples, len(users), epochs=cfg.joint_epochs, seed=seed)
    train_s = time.perf_counter() - t0

    def predict(u, rows):
        return [stream.labels[i] for i in predict_joint(model, batcher, inputs(rows), index[u])]

    test = {u: score(predict(u, stream.test(u)), stream.test(u), stream.labels) for u in users}
    # Trained once on every day together: there is no "after night d" to forget from.
    return {"per_night": [{"night": stream.days, "per_user": test, "train_seconds": round(train_s, 1),
                           "note": "trained once on all days' feedback of all users"}],
            "acc": None, "seconds": [], "training": report}


@dataclass(frozen=True)
class Task:
    """One run: a row under a protocol with a seed (the base row's protocol is irrelevant)."""

    row: str
    protocol: Protocol
    seed: int

    @property
    def label(self) -> str:
        return f"{self.protocol.key}/seed{self.seed}/{self.row}"


# nightowl's subpackages live in top-level folders (pyproject's package-dir), not under
# nightowl/: walking nightowl/ alone missed them, and runs of changed night code were reused.
PACKAGES = ("nightowl", "nightowl.adapters", "nightowl.continual", "nightowl.memory", "nightowl.scheduler",
            "nightowl.api", "nightowl.day")


def code_files() -> list[Path]:
    """Every source file of the installed nightowl package (wherever pyproject maps each
    subpackage from) and of the benchmarks."""
    import importlib

    dirs = {Path(__file__).resolve().parent}
    for name in PACKAGES:
        dirs.update(Path(p) for p in importlib.import_module(name).__path__)
    return sorted({f.resolve() for d in dirs for f in d.rglob("*.py")})


def code_digest() -> str:
    """A digest of `code_files`: a finished run is reused only by the same code."""
    h = hashlib.sha256()
    for f in code_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _task_cache(task: Task, users: list[str], base_dir: Path, cfg: BenchConfig) -> Path:
    """Keyed by everything a run's numbers depend on: the code, the stream, the users, the base
    model's files, the row's update settings, the protocol and the seed."""
    row = ROWS[task.row]
    update = row.update_config().model_dump() if row.kind == "nightly" else None
    key = hashlib.sha256(json.dumps([task.row, asdict(task.protocol) if row.kind == "nightly" else None, task.seed, users,
                                     model_digest(base_dir), update, cfg.joint_epochs, cfg.code,
                                     _digest(cfg.rationales) if row.rationales else None,
                                     _digest(cfg.stream)]).encode())
    return cfg.work / "runs" / f"{task.row}-{key.hexdigest()[:16]}.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextmanager
def work_in_use(work: Path, exclusive: bool) -> Iterator[None]:
    """Holds `work`'s lock file: a run takes it whole (another run's or its workers' hold is a
    clear error, not two runs writing into the same homes), then shares it with its own workers;
    each task holds a shared hold, so a worker left running after its run was killed still keeps
    the next run out."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StreamError(f"{work} is in use by another benchmark run or its workers: wait for it, stop its "
                              "process group, or pass another --work") from None
        if exclusive:
            fcntl.flock(fd, fcntl.LOCK_SH)  # the run's own workers share it
        yield
    finally:
        os.close(fd)


def run_task(task: Task, users: list[str], base_dir: Path, global_replay: Path | None, cfg: BenchConfig,
             threads: int, position: int = 0) -> tuple[Task, dict]:
    with work_in_use(cfg.work, exclusive=False):
        return _run_task(task, users, base_dir, global_replay, cfg, threads, position)


def _run_task(task: Task, users: list[str], base_dir: Path, global_replay: Path | None, cfg: BenchConfig,
              threads: int, position: int) -> tuple[Task, dict]:
    cache = _task_cache(task, users, base_dir, cfg)
    if cache.exists():  # finished by an earlier, interrupted run of the same configuration
        return task, {**json.loads(cache.read_text()), "from_cache": True}
    torch.set_num_threads(threads)
    stream = read_stream(cfg.stream)
    t0 = time.perf_counter()
    kind = ROWS[task.row].kind
    if kind == "base":
        out = run_base(stream, users, base_dir, cfg, task.seed)
    elif kind == "joint":
        out = run_joint(stream, users, base_dir, cfg, task.seed)
    else:
        out = run_nightly(task.row, task.protocol, task.seed, stream, users, base_dir, global_replay, cfg, position)
    out["run_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = json.loads(json.dumps(out))  # as the cache will give it back (int keys become strings)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(out))
    return task, out


# -- statistics ----------------------------------------------------------------------------------

def bootstrap_ci(values, resamples: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d sample")
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_gain(rows: list[dict], bases: list[dict], users: list[str], key: str = "macro_f1") -> np.ndarray:
    """[seeds, users] gains of a row over the base, user by user, seed by seed."""
    return np.array([[row[u][key] - base[u][key] for u in users] for row, base in zip(rows, bases)])


def batched_macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 in points over the last axis, batched over the others, by `scores`' convention
    (over the labels present in gold or prediction; F1 0 for a present label never predicted
    right). `gold` broadcasts against `pred`."""
    gold, pred = np.broadcast_arrays(gold, pred)
    total = np.zeros(pred.shape[:-1])
    present_n = np.zeros(pred.shape[:-1])
    for c in range(n_labels):
        g, p = gold == c, pred == c
        tp = (g & p).sum(-1)
        fp_fn = (g ^ p).sum(-1)  # fp + fn: one of the two is c, not both
        present = (g | p).any(-1)
        total += np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp_fn, 1), 0.0) * present
        present_n += present
    return 100 * total / np.maximum(present_n, 1)


def answer_stats(finals: list[dict], base_finals: list[dict], users: list[str], truth: dict[str, list[str]],
                 labels: list[str], resamples: int = 1000, seed: int = 0) -> dict | None:
    """What a row's last-night test answers do against the base's, post by post (None for runs
    recorded before answers were kept):
    - `share_changed`, `changed_right`: the share of answers that differ from the base's, and of
      those the share that are right: the precision that decides how often a user's small test
      set shows their gain (benchmarks.power);
    - `changes_repeated`: of the posts one seed's model changed, the share another seed's changed
      too, and `seed_correlation` = (that - share_changed) / (1 - share_changed): 0 if the seeds
      change posts independently, 1 if they change the same ones (benchmarks.power's two cases);
    - `users_clearly_better` / `_worse`: users whose gain (averaged over the seeds) has a 95%
      paired bootstrap interval over their own test posts above / below 0."""
    if any("answers" not in r[u] for rows in (finals, base_finals) for r in rows for u in users):
        return None
    index = {lab: i for i, lab in enumerate(labels)}
    rng = np.random.default_rng(seed)
    changed = right = total = repeated = pairs = 0
    clearly = {"better": 0, "worse": 0}
    for u in users:
        gold = np.array([index[t] for t in truth[u]])
        row = np.array([[index[a] for a in r[u]["answers"]] for r in finals])  # [seeds, posts]
        base = np.array([[index[a] for a in b[u]["answers"]] for b in base_finals])
        diff = row != base
        changed += int(diff.sum())
        right += int((diff & (row == gold)).sum())
        total += diff.size
        for s in range(len(finals)):
            for t in range(len(finals)):
                if s != t:
                    repeated += int((diff[s] & diff[t]).sum())
                    pairs += int(diff[s].sum())
        idx = rng.integers(0, len(gold), size=(resamples, len(gold)))
        gains = (batched_macro_f1(gold[idx][:, None, :], row[:, idx].transpose(1, 0, 2), len(labels))
                 - batched_macro_f1(gold[idx][:, None, :], base[:, idx].transpose(1, 0, 2), len(labels))).mean(axis=1)
        lo, hi = np.quantile(gains, [0.025, 0.975])
        clearly["better"] += bool(lo > 0)
        clearly["worse"] += bool(hi < 0)
    q = changed / max(1, total)
    rep = repeated / pairs if pairs else None
    return {"share_changed": round(q, 4), "changed_right": round(right / changed, 4) if changed else None,
            "changes_repeated": None if rep is None else round(rep, 4),
            "seed_correlation": None if rep is None or q >= 1 else round((rep - q) / (1 - q), 4),
            "users_clearly_better": clearly["better"], "users_clearly_worse": clearly["worse"], "users": len(users)}


def summarize(name: str, runs: dict[int, dict], base: dict[int, dict], users: list[str], last: int, cfg: BenchConfig,
              truth: dict[str, list[str]] | None = None, labels: list[str] | None = None) -> dict:
    """A row's figures over seeds: paired gains with a bootstrap interval over users (each
    user's gain averaged over seeds first), shares of users better / worse than the base, and
    (given the test posts' `truth`) how its answers differ from the base's (`answer_stats`)."""
    seeds = sorted(runs)
    finals = [runs[s]["per_night"][-1]["per_user"] for s in seeds]
    base_finals = [base[s]["per_night"][-1]["per_user"] for s in seeds]
    gains = paired_gain(finals, base_finals, users)
    per_user_gain = gains.mean(axis=0)
    lo, hi = bootstrap_ci(per_user_gain, cfg.bootstrap)
    per_seed = []
    for k, s in enumerate(seeds):
        raw, f, b = runs[s], None, None
        if raw.get("acc") is not None:
            pairs = [_forgetting(raw["acc"][u], last) for u in users]
            fs, bs = [p[0] for p in pairs if p[0] is not None], [p[1] for p in pairs if p[1] is not None]
            f, b = (statistics.fmean(fs) if fs else None), (statistics.fmean(bs) if bs else None)
        served = [n["served"] for n in raw["per_night"] if "served" in n]
        per_seed.append({
            "seed": s,
            "macro_f1_mean": statistics.fmean(finals[k][u]["macro_f1"] for u in users),
            "accuracy_mean": statistics.fmean(finals[k][u]["accuracy"] for u in users),
            "gain_mean": float(gains[k].mean()),
            "share_better": float((gains[k] > 0).mean()),
            "share_worse": float((gains[k] < 0).mean()),
            "forgetting": f, "bwt": b,
            "seconds_per_user_night_median": statistics.median(raw["seconds"]) if raw.get("seconds") else None,
            # answers the users saw during the days (the prequential score: no test data in it)
            "served_accuracy": (100 * sum(d[u]["right"] for d in served for u in users)
                                / max(1, sum(d[u]["answers"] for d in served for u in users))) if served else None,
            "labels_given_per_user": (statistics.median(sum(d[u]["labels_given"] for d in served) for u in users)
                                      if served else None),
            "run_seconds": raw.get("run_seconds"),
            "from_cache": raw.get("from_cache", False),
        })

    def mean_of(key: str):
        vals = [p[key] for p in per_seed if p[key] is not None]
        return round(statistics.fmean(vals), 3) if vals else None

    curve = []
    n_nights = min(len(runs[s]["per_night"]) for s in seeds)
    if n_nights == last:  # the joint reference has only its final night
        for n in range(n_nights):
            g = paired_gain([runs[s]["per_night"][n]["per_user"] for s in seeds],
                            [base[s]["per_night"][n]["per_user"] for s in seeds], users).mean(axis=0)
            clo, chi = bootstrap_ci(g, cfg.bootstrap)
            curve.append({"night": n + 1, "gain_mean": round(float(g.mean()), 3), "gain_ci95": [round(clo, 3), round(chi, 3)]})
    seconds = [x for s in seeds for x in runs[s].get("seconds") or []]
    row = ROWS[name]
    return {
        "name": name,
        "about": row.about,
        "update_changes": row.update,
        "seeds": seeds,
        "macro_f1_mean": mean_of("macro_f1_mean"),
        "accuracy_mean": mean_of("accuracy_mean"),
        "gain_mean": round(float(per_user_gain.mean()), 3),
        "gain_ci95": [round(lo, 3), round(hi, 3)],
        "share_better": mean_of("share_better"),
        "share_worse": mean_of("share_worse"),
        "forgetting": mean_of("forgetting"),
        "bwt": mean_of("bwt"),
        "seconds_per_user_night_median": round(statistics.median(seconds), 2) if seconds else None,
        "served_accuracy": mean_of("served_accuracy"),
        "labels_given_per_user": mean_of("labels_given_per_user"),
        "per_seed": per_seed,
        "gain_by_night": curve,
        "per_user_gain": {u: round(float(g), 3) for u, g in zip(users, per_user_gain)},
        "answers_vs_base": (answer_stats(finals, base_finals, users, truth, labels, cfg.bootstrap // 4)
                            if truth is not None and name != "base" else None),
    }


# -- plots ---------------------------------------------------------------------------------------

def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    protocols = result["protocols"]
    written = []
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), sharey=True, squeeze=False)
    for ax, (key, proto) in zip(axes[0], protocols.items()):
        for r in proto["rows"]:
            if not r["gain_by_night"] or r["name"] == "base":
                continue
            xs = [0] + [c["night"] for c in r["gain_by_night"]]
            ys = [0.0] + [c["gain_mean"] for c in r["gain_by_night"]]
            lo = [0.0] + [c["gain_ci95"][0] for c in r["gain_by_night"]]
            hi = [0.0] + [c["gain_ci95"][1] for c in r["gain_by_night"]]
            ax.plot(xs, ys, marker="o", lw=2.5 if r["name"] == "nightowl" else 1.5, color=COLORS[r["name"]], label=r["name"])
            ax.fill_between(xs, lo, hi, color=COLORS[r["name"]], alpha=0.15)
        ax.axhline(0, color="black", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("night (0 = base model)")
        ax.set_title(key)
    axes[0][0].set_ylabel("macro-F1 gain over the base (points, 95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['n_users']} users, seeds {result['seeds']}: mean gain after each night")
    written.append(_save(fig, out, "curves"))

    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), sharey=True, squeeze=False)
    for ax, (key, proto) in zip(axes[0], protocols.items()):
        rows = [r for r in proto["rows"] if r["name"] != "base"]
        for i, r in enumerate(rows):
            err = [[r["gain_mean"] - r["gain_ci95"][0]], [r["gain_ci95"][1] - r["gain_mean"]]]
            ax.bar(i, r["gain_mean"], yerr=err, capsize=4, color=COLORS[r["name"]])
            ax.text(i, min(0, r["gain_ci95"][0]) - 0.5, f"{100 * r['share_better']:.0f}% up\n{100 * r['share_worse']:.0f}% down",
                    ha="center", va="top", fontsize=7)
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=1)
        ax.set_title(key)
    axes[0][0].set_ylabel("macro-F1 gain after the last night (95% CI)")
    written.append(_save(fig, out, "gains"))
    return written


def _save(fig, out: Path, what: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out.with_name(f"{out.stem}-{what}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# -- the command ---------------------------------------------------------------------------------

def plan(cfg: BenchConfig) -> list[Task]:
    """Every run the results need: the base first (every gain is measured against it)."""
    tasks = [Task("base", Protocol("labelled"), s) for s in cfg.seeds]
    # protocol by protocol, seed by seed: an interrupted run has whole comparisons done
    for p in cfg.protocols:
        for s in cfg.seeds:
            tasks += [Task(name, p, s) for name in cfg.rows if ROWS[name].kind == "nightly"]
    tasks += [Task(name, Protocol("labelled"), s) for name in cfg.rows if ROWS[name].kind == "joint" for s in cfg.seeds]
    return tasks


def run(cfg: BenchConfig) -> dict:
    unknown = set(cfg.rows) - set(ROWS)
    if unknown:
        raise StreamError(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    with work_in_use(cfg.work, exclusive=True):
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict:
    cfg.rows = ["base"] + [r for r in cfg.rows if r != "base"]  # every gain is measured against the base
    started = time.perf_counter()
    stream = read_stream(cfg.stream)
    if stream.days < 1:
        raise StreamError("the stream has no feedback days (day >= 1)")
    users = eligible_users(stream, cfg)
    base_dir = train_base(stream, cfg)
    global_replay = write_global_replay(stream, cfg)
    if any(ROWS[r].rationales for r in cfg.rows):
        from benchmarks.rationales import rationales_file

        cfg.rationales = rationales_file(stream, users, cfg.work, Settings(home=cfg.work / "homes" / "rationales"), cfg.jobs)
    tasks = plan(cfg)
    print(f"personalize: {len(users)} users, {stream.days} nights, {len(tasks)} runs "
          f"({len(cfg.seeds)} seeds x {[p.key for p in cfg.protocols]} x {cfg.rows}), {cfg.jobs} process(es)", flush=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.jobs))
    args = [(t, users, base_dir, global_replay, cfg, threads, i % cfg.jobs) for i, t in enumerate(tasks)]
    if cfg.jobs > 1:
        with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn")) as pool:
            raw = dict(pool.map(run_task, *zip(*args)))
    else:
        raw = dict(run_task(*a) for a in args)

    base = {t.seed: out for t, out in raw.items() if t.row == "base"}
    truth = {u: [r.label for r in stream.test(u)] for u in users}
    protocols = {}
    for p in cfg.protocols:
        rows = []
        for name in cfg.rows:
            kind = ROWS[name].kind
            if kind == "joint" and p.name != "labelled":
                continue
            runs = {t.seed: out for t, out in raw.items() if t.row == name and (kind != "nightly" or t.protocol == p)}
            rows.append(summarize(name, runs, base, users, stream.days, cfg, truth, stream.labels))
        protocols[p.key] = {"protocol": asdict(p), "rows": rows}
    n_feedback = [sum(len(stream.feedback(u, d)) for d in range(1, stream.days + 1)) for u in users]
    result = {
        "benchmark": "personalize",
        "stream": str(cfg.stream),
        "stream_header": stream.header,
        "command": command_line(cfg),
        "code_digest": cfg.code,
        "commit": _commit(),
        "users_rule": users_rule(cfg),
        "users": users,
        "n_users": len(users),
        "n_users_in_stream": len(stream.users()),
        "seeds": cfg.seeds,
        "nights": stream.days,
        "labels": stream.labels,
        "test_rows_per_user_median": statistics.median(len(stream.test(u)) for u in users),
        "feedback_rows_per_user_median": statistics.median(n_feedback),
        "update_config_default": UpdateConfig().model_dump(),
        "base_model_dir": str(base_dir),
        "rationales": ({"file": str(cfg.rationales), "posts": len(cfg.rationales.read_text("utf-8").splitlines()),
                        "provider": "local (settings.generator_model), greedy; feedback posts only (test posts are "
                                    "answered before a rationale exists, as in the product)"}
                       if cfg.rationales else None),
        "metrics": "macro-F1/accuracy in percent on each user's private test set after the last night; gain = row "
                   "minus base per user (macro-F1 points), averaged over seeds per user, mean over users with a 95% "
                   "percentile bootstrap interval over users; shares of users better/worse than the base per seed, "
                   "averaged; forgetting/BWT (avalanche) in accuracy points over each day's feedback items, from "
                   "the night that learned them to the last night; served_accuracy: the answers users saw by day",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "processes": cfg.jobs},
        "total_seconds": round(time.perf_counter() - started, 1),
        "protocols": protocols,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, cfg.out)
    atomic_write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result


def command_line(cfg: BenchConfig) -> str:
    parts = [f"python -m benchmarks.personalize --stream {cfg.stream} --out {cfg.out}"]
    parts += [f"--seed {s}" for s in cfg.seeds] + [f"--row {r}" for r in cfg.rows if r != "base"]
    parts += [f"--protocol {p}" for p in dict.fromkeys(p.name for p in cfg.protocols)]
    parts += [f"--p-correct {p.p_correct:g}" for p in cfg.protocols if p.name == "realistic"]
    confirm = {p.p_confirm for p in cfg.protocols if p.name == "realistic"}
    parts += [f"--p-confirm {c:g}" for c in confirm]
    if cfg.users:
        parts.append(f"--users {cfg.users}")
    parts.append(f"--jobs {cfg.jobs}")
    return " ".join(parts)


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except OSError:
        return None


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def personalize(
    stream: Annotated[Path, typer.Option(help="A personalization stream (JSONL; see benchmarks/stream.py).")],
    out: Annotated[Path, typer.Option(help="Results JSON (plots are written beside it).")],
    seeds: Annotated[Optional[list[int]], typer.Option("--seed", help="Seeds (repeatable; default 0 1 2).")] = None,
    rows: Annotated[Optional[list[str]], typer.Option("--row", help=f"Rows (repeatable; base always runs): {', '.join(ROWS)}.")] = None,
    protocols: Annotated[Optional[list[str]], typer.Option("--protocol", help="labelled and/or realistic (default both).")] = None,
    p_correct: Annotated[Optional[list[float]], typer.Option(help="Realistic: chance a wrong answer is corrected (repeatable; default 1.0 and 0.3).")] = None,
    p_confirm: Annotated[float, typer.Option(help="Realistic: chance a right answer is confirmed.")] = 0.05,
    users: Annotated[Optional[int], typer.Option(help="A seeded subset of K eligible users (default: all).")] = None,
    min_feedback: Annotated[int, typer.Option(help="Eligible users have at least this many feedback rows.")] = 100,
    min_test: Annotated[int, typer.Option(help="... and at least this many test rows.")] = 20,
    base_model: Annotated[Optional[Path], typer.Option(help="Use this base model instead of training one on day 0.")] = None,
    base_epochs: int = 3,
    joint_epochs: int = 2,
    jobs: Annotated[int, typer.Option(help="Runs in this many processes.")] = 1,
    work: Annotated[Optional[Path], typer.Option(help="Scratch folder (homes, cached base model, finished runs).")] = None,
) -> None:
    """Day-by-day personalization benchmark: posts answered and fed back through the logging path, real nights."""
    if not stream.is_file():
        _fail(f"stream file not found: {stream}")
    if jobs < 1 or base_epochs < 1 or joint_epochs < 1 or min_feedback < 1 or min_test < 1:
        _fail("--jobs, the epoch counts and the minimums must be at least 1")
    chosen = protocols or ["labelled", "realistic"]
    if set(chosen) - {"labelled", "realistic"}:
        _fail(f"unknown protocol(s) {sorted(set(chosen) - {'labelled', 'realistic'})}: choose labelled or realistic")
    ps = p_correct or [1.0, 0.3]
    if not all(0 <= p <= 1 for p in ps + [p_confirm]):
        _fail("--p-correct and --p-confirm are probabilities in [0, 1]")
    plan_protocols = ([Protocol("labelled")] if "labelled" in chosen else []) + (
        [Protocol("realistic", p, p_confirm) for p in ps] if "realistic" in chosen else [])
    cfg = BenchConfig(stream=stream, out=out, seeds=seeds if seeds is not None else [0, 1, 2], rows=rows or list(DEFAULT_ROWS),
                      protocols=plan_protocols, users=users or None, min_feedback=min_feedback, min_test=min_test,
                      base_model=base_model, base_epochs=base_epochs, joint_epochs=joint_epochs, jobs=jobs,
                      work=work or WORK)
    try:
        result = run(cfg)
    except StreamError as exc:
        _fail(str(exc))
    keys = ("name", "macro_f1_mean", "gain_mean", "gain_ci95", "share_better", "share_worse", "forgetting",
            "seconds_per_user_night_median")
    typer.echo(json.dumps({"out": str(out), "users": result["n_users"],
                           "protocols": {k: [{x: r[x] for x in keys} for r in v["rows"]] for k, v in result["protocols"].items()}},
                          indent=2))


if __name__ == "__main__":
    app()
