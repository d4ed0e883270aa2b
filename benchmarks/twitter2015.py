"""Twitter-2015 (multimodal aspect-based sentiment) benchmark of the rationale-fused model.

    python -m benchmarks.twitter2015 [--seeds 0 1 2] [--epochs 4] [--rows text text_image text_image_rationale]

Rows (every one is scored on the test set WITHOUT rationales: the teacher's rationales saw the
gold label, so giving them at test time would be label leakage):
- text: post + aspect; trained on train, selected on dev.
- text_image: + EfficientNet-Lite0 region features; trained on train, selected on dev.
- text_image_rationale: + the teacher's rationales as a training signal (dual cross-attention
  when given, distilled into the rationale-prediction head, which stands in for them at test
  time). Only dev has rationales, so it trains on train + dev and selects on a 15% slice carved
  from train.
- text_image_traindev: the rationale row's data and selection without the rationales, so the
  difference between the two is the rationales' own effect.
`--teacher ROW [ROW ...]` trains the rows as students of those rows' saved seed models (the
probability average of every `--seeds` model of each: a seed ensemble, or a larger encoder's row):
their soft labels on the student's training posts (served as a post is: no rationale) join the
labels with weight `distill_alpha` (`--recipe distill_alpha=A`, default 0.5; `--tag` names the
variant). A teacher seed's 15% selection slice differs from the student's, so the teachers have
seen part of a student's selection slice: its selection scores lean optimistic; test is untouched.
Writes benchmarks/results/twitter2015.json (accuracy and macro-F1 in percent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import torch

from nightowl.adapters.config import FusionConfig
from nightowl.adapters.data import (
    TOMBERT_LABELS,
    Row,
    attach_rationales,
    image_features,
    read_tombert_tsv,
)
from nightowl.adapters.encoders import ImageEncoder, load_tokenizer
from nightowl.adapters.inputs import Batcher, ModelInput
from nightowl.adapters.train import TrainRecipe, evaluate_items, teacher_logits_of, train_base_model
from nightowl.io import atomic_write_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitter2015"
WORK = Path(__file__).resolve().parent / "work"
RESULTS = Path(__file__).resolve().parent / "results" / "twitter2015.json"
PUBLISHED = [
    {"name": "TomBERT (published)", "accuracy_mean": 77.15, "macro_f1_mean": 71.75, "reference": True},
    {"name": "VLP-MABSA (published)", "accuracy_mean": 78.6, "macro_f1_mean": 73.8, "reference": True},
]


def to_items(rows: list[Row], feats: dict, use_image: bool, use_rationale: bool) -> list[tuple[ModelInput, int]]:
    out = []
    for r in rows:
        f = feats.get(r.image_id) if use_image and r.image_id else None
        item = ModelInput(r.text, r.aspect, None, f.float() if f is not None else None, r.rationale if use_rationale else None)
        out.append((item, r.label))
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs (values as JSON where they parse, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_row(name: str, seed: int, epochs: int, data: dict, feats: dict, recipe: dict | None = None,
            model: dict | None = None, tag: str = "", teachers: list[Path] | None = None) -> dict:
    use_image = name != "text"
    use_rationale = name == "text_image_rationale"
    traindev = name in ("text_image_rationale", "text_image_traindev")
    train_rows, select_rows = data["train"], data["dev"]
    select_note = "dev"
    if traindev:
        rng = random.Random(1000 + seed)
        shuffled = data["train"][:]
        rng.shuffle(shuffled)
        cut = int(0.15 * len(shuffled))
        select_rows, train_rows = shuffled[:cut], shuffled[cut:] + data["dev"]
        select_note = f"15% slice of train ({cut} rows); dev joins training" + (" with its rationales" if use_rationale else "")
    config = FusionConfig(labels=TOMBERT_LABELS, **(model or {}))
    config.training = {"dataset": "twitter2015", "row": name, "seed": seed, "selection": select_note,
                       "teacher": [str(t.relative_to(WORK)) for t in teachers] if teachers else None}
    out_dir = WORK / "models" / f"{name}{tag}-seed{seed}"
    recipe = dict(recipe or {})
    taught = None
    if teachers:
        recipe.setdefault("distill_alpha", 0.5)
        t_teach = time.perf_counter()
        taught = teacher_logits_of(teachers, [x for x, _ in to_items(train_rows, feats, use_image, False)])
        print(f"teacher: {len(teachers)} models on {len(train_rows)} posts in {time.perf_counter() - t_teach:.0f}s", flush=True)
    t0 = time.perf_counter()
    model, report = train_base_model(
        to_items(train_rows, feats, use_image, use_rationale),
        to_items(select_rows, feats, use_image, False),  # select as we serve: no rationale
        config,
        out_dir,
        TrainRecipe(epochs=epochs, seed=seed, **recipe),
        teacher_logits=taught,
    )
    train_s = time.perf_counter() - t0
    batcher = Batcher(load_tokenizer(config.text_model), config)
    test = to_items(data["test"], feats, use_image, False)  # never a rationale at test time
    t1 = time.perf_counter()
    result = evaluate_items(model, batcher, [t[0] for t in test], [t[1] for t in test])
    infer_ms = (time.perf_counter() - t1) / len(test) * 1000
    # single-example latency, as served
    model.eval()
    lat = []
    with torch.inference_mode():
        for item, _ in test[:50]:
            t = time.perf_counter()
            model(**batcher([item]))
            lat.append((time.perf_counter() - t) * 1000)
    return {
        "seed": seed,
        "accuracy": 100 * result["accuracy"],  # percent in the results file
        "macro_f1": 100 * result["macro_f1"],
        "confusion": result["confusion"],
        "epoch_seconds": [e["seconds"] for e in report["epochs"]],
        "selected_epoch": report.get("selected_epoch"),
        "train_seconds": round(train_s, 1),
        "batched_inference_ms_per_example": round(infer_ms, 2),
        "single_inference_ms_median": round(statistics.median(lat), 2),
        "model_dir": str(out_dir.relative_to(Path(__file__).resolve().parents[1])),
        "selection": select_note,
        "teacher": config.training["teacher"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rows", nargs="*", default=["text", "text_image", "text_image_rationale"])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE", help="TrainRecipe overrides, e.g. lr_encoder=1e-3")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="FusionConfig overrides, e.g. target_pooling=false")
    ap.add_argument("--tag", default="", help="suffix for the row names and model folders of this variant")
    ap.add_argument("--teacher", nargs="*", default=[], metavar="ROW",
                    help="train the rows as students of these rows' saved --seeds models (their probability average)")
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="ROW",
                    help="also score the probability average of these rows' saved seed models (no training)")
    args = ap.parse_args()
    recipe, model_overrides = parse_overrides(args.recipe), parse_overrides(args.model)
    torch.set_num_threads(args.threads)
    teachers = [WORK / "models" / f"{row}-seed{s}" for row in args.teacher for s in args.seeds]
    missing = [str(t) for t in teachers if not (t / "nightowl_config.json").is_file()]
    if missing:
        raise SystemExit(f"teacher models not trained yet (run their rows first): {', '.join(missing)}")

    data = {s: read_tombert_tsv(args.data / f"{s}.tsv") for s in ("train", "dev", "test")}
    n_rat = attach_rationales(data["dev"], args.data / "dev.rationales.jsonl")
    feats: dict = {}
    if any(r != "text" for r in args.rows + args.ensemble):
        t = time.perf_counter()
        feats = image_features(data["train"] + data["dev"] + data["test"], args.data / "images", ImageEncoder(),
                               WORK / "twitter2015_image_features.safetensors")
        print(f"image features: {len(feats)} images in {time.perf_counter() - t:.0f}s", flush=True)

    previous = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = {r["name"]: r for r in previous.get("rows", []) if not r.get("reference")}
    for name in args.rows:
        per_seed = []
        for seed in args.seeds:
            res = run_row(name, seed, args.epochs, data, feats, recipe, model_overrides, args.tag, teachers)
            print(json.dumps({"row": name, **{k: v for k, v in res.items() if k != "confusion"}}), flush=True)
            per_seed.append(res)
        rows[name + args.tag] = {
            "name": name + args.tag,
            "accuracy_mean": round(statistics.fmean(r["accuracy"] for r in per_seed), 2),
            "macro_f1_mean": round(statistics.fmean(r["macro_f1"] for r in per_seed), 2),
            "accuracy_std": round(statistics.pstdev(r["accuracy"] for r in per_seed), 2),
            "macro_f1_std": round(statistics.pstdev(r["macro_f1"] for r in per_seed), 2),
            "per_seed": per_seed,
            "command": " ".join(["python -m benchmarks.twitter2015 --rows", name, "--seeds", *map(str, args.seeds),
                                 "--epochs", str(args.epochs)]
                                + (["--recipe", *args.recipe] if args.recipe else [])
                                + (["--model", *args.model] if args.model else [])
                                + (["--tag", args.tag] if args.tag else [])
                                + (["--teacher", *args.teacher] if args.teacher else [])),
            "model_dir": per_seed[0]["model_dir"],
            "epoch_seconds_median": statistics.median(s for r in per_seed for s in r["epoch_seconds"]),
            "single_inference_ms_median": statistics.median(r["single_inference_ms_median"] for r in per_seed),
            "peak_rss_mb": _peak_rss_mb(),  # this process: the row's training and scoring
        }
        _write(args.out, rows, data, n_rat)
    for name in args.ensemble:
        row = ensemble_row(name + args.tag, args.seeds, data, feats, use_image=name != "text")
        print(json.dumps({k: v for k, v in row.items() if k != "confusion"}), flush=True)
        rows[row["name"]] = row
        _write(args.out, rows, data, n_rat)


def ensemble_row(name: str, seeds: list[int], data: dict, feats: dict, use_image: bool) -> dict:
    """The probability average of a row's saved seed models on test (no rationales): what the
    seeds reach together, at len(seeds) times the inference cost."""
    from nightowl.adapters.checkpoint import load_base_model
    from nightowl.adapters.train import predict_logits, scores

    test = to_items(data["test"], feats, use_image, False)
    probs = []
    for seed in seeds:
        model = load_base_model(WORK / "models" / f"{name}-seed{seed}")
        batcher = Batcher(load_tokenizer(model.config.text_model), model.config)
        probs.append(predict_logits(model, batcher, [t[0] for t in test]).softmax(-1))
    result = scores([t[1] for t in test], torch.stack(probs).mean(0).argmax(-1).tolist(), len(TOMBERT_LABELS))
    return {
        "name": f"{name}_ensemble{len(seeds)}",
        "accuracy_mean": round(100 * result["accuracy"], 2),  # percent in the results file
        "macro_f1_mean": round(100 * result["macro_f1"], 2),
        "ensemble_of": [f"{name}-seed{s}" for s in seeds],
        "confusion": result["confusion"],
        "command": f"python -m benchmarks.twitter2015 --rows --ensemble {name} --seeds {' '.join(map(str, seeds))}",
        "note": f"probability average of {len(seeds)} seed models: {len(seeds)}x the inference cost of one",
    }


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write(out_path: Path, rows: dict, data: dict, n_rat: int) -> None:
    out = {
        "benchmark": "twitter2015",
        "command": "python -m benchmarks.twitter2015 [--rows ...] [--seeds ...] [--epochs N] (each row names its own run)",
        "test_set": f"{len(data['test'])} rows, scored without rationales",
        "rationales": f"teacher rationales for {n_rat} dev rows (label-conditioned: training signal only)",
        "backbone": "all-MiniLM-L6-v2 (packaged) + EfficientNet-Lite0 (packaged, frozen)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cuda" if torch.cuda.is_available() else "cpu"},
        # the largest any row's process reached (each row's own figure is in the row)
        "peak_rss_mb": max([_peak_rss_mb()] + [r["peak_rss_mb"] for r in rows.values() if r.get("peak_rss_mb")]),
        "rows": list(rows.values()) + PUBLISHED,
    }
    atomic_write_text(out_path, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
