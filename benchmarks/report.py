"""README tables from the benchmark results files, so the README never quotes a number by hand.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # rewrite them in README.md, between their markers

Each table sits in README.md between `<!-- table:NAME -->` and `<!-- /table:NAME -->`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from nightowl.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _mb(v) -> str:
    return "–" if v is None else f"{v / 1024:.1f} GB"


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1f}%"


def twitter2015_table(path: Path = RESULTS / "twitter2015.json") -> str:
    data = json.loads(path.read_text())
    lines = [
        "| row | accuracy | macro-F1 | seeds (acc / F1) | s per epoch | ms per post | peak RSS | trained on, selected on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r.get("reference"):
            lines.append(f"| {r['name']} | {r['accuracy_mean']:.2f} | {r['macro_f1_mean']:.2f} | | | | | published |")
            continue
        if r.get("ensemble_of"):
            lines.append(f"| {r['name']} | {r['accuracy_mean']:.2f} | {r['macro_f1_mean']:.2f} | "
                         f"average of {len(r['ensemble_of'])} seed models | | | | {r['note']} |")
            continue
        seeds = ", ".join(f"{s['accuracy']:.1f} / {s['macro_f1']:.1f}" for s in r["per_seed"])
        where = r["per_seed"][0].get("selection", "dev")
        trained = "train + dev" if "dev joins" in where or "dev (with rationales) joins" in where else "train"
        selected = "15% slice of train" if trained == "train + dev" else "dev"
        def spread(key: str) -> str:  # one seed has no spread to show
            return f" ± {r[key]:.2f}" if len(r["per_seed"]) > 1 else " (1 seed)"

        lines.append(
            f"| {r['name']} | {r['accuracy_mean']:.2f}{spread('accuracy_std')} | {r['macro_f1_mean']:.2f}"
            f"{spread('macro_f1_std')} | {seeds} | {r['epoch_seconds_median']:.0f} | "
            f"{r['single_inference_ms_median']:.1f} | {_mb(r.get('peak_rss_mb'))} | {trained}, {selected} |"
        )
    return "\n".join(lines)


def _decision(defaults: dict) -> str:
    if not defaults.get("decision_offset"):
        return "no decision offset"
    return f"decision offset, penalty {defaults['decision_penalty']:g}"


def personalize_table(path: Path = RESULTS / "personalization-multipico_en.json") -> str:
    data = json.loads(path.read_text())
    defaults = data["update_config_default"]
    lines = [
        f"{data['n_users']} of {data['n_users_in_stream']} users ({data['users_rule']}), {data['nights']} nights, "
        f"seeds {', '.join(map(str, data['seeds']))}; per-user private test sets (median "
        f"{data['test_rows_per_user_median']:g} posts). Commit {data.get('commit') or '?'}, the product's default update "
        f"({defaults['epochs']} epochs, replay {defaults['replay']}, {defaults['n_global']} global examples, "
        f"held back {defaults['holdout_fraction']:g}, answers let stand {defaults.get('standing_ratio', 0):g} per label, "
        f"gate evidence z {defaults.get('gate_evidence_z', 0):g}, {_decision(defaults)}"
        f"{', answers let stand doubted' if defaults.get('doubt_silence') else ''}); `{data['command']}`.",
    ]
    for key, proto in data["protocols"].items():
        p = proto["protocol"]
        what = ("every post labelled" if p["name"] == "labelled" else
                f"wrong answers corrected with p = {p['p_correct']:g}, right ones confirmed with p = {p['p_confirm']:g}")
        # runs that kept their test answers also say how they differ from the base's
        answers = any(r.get("answers_vs_base") for r in proto["rows"])
        lines += [
            "",
            f"**{key}** ({what}):",
            "",
            "| row | macro-F1 | gain vs base (F1 points, 95% CI) | users better | users worse | forgetting | BWT "
            "| labels per user | answers right | s per user-night |"
            + (" test answers changed vs the base | users clearly better / worse |" if answers else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if answers else ""),
        ]
        for r in proto["rows"]:
            lo, hi = r["gain_ci95"]
            changed, clearly = _answers([r]) if answers else ("", "")
            lines.append(
                f"| {r['name']} | {r['macro_f1_mean']:.2f} | {r['gain_mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                f"{100 * r['share_better']:.0f}% | {100 * r['share_worse']:.0f}% | {_fmt(r['forgetting'])} | "
                f"{_fmt(r['bwt'])} | {_fmt(r['labels_given_per_user'], 0)} | {_pct(r['served_accuracy'])} | "
                f"{_fmt(r['seconds_per_user_night_median'], 1)} |" + (f" {changed} | {clearly} |" if answers else "")
            )
    return "\n".join(lines)


# Steps of the nightowl row, each against the runs before it (one results file a seed), per
# protocol: (files before, files after), the same users, paired user by user.
P = "personalization-multipico_en"
STEPS = {
    # fallback_to_prior (805a9a5, 9ed71ac) against ba6ac26
    "fallback": {
        "labelled": ([f"{P}-labelled.json"], [f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"]),
        "realistic_p0.3": ([f"{P}.json"], [f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json"]),
    },
    # the decision offset (25d607f) against fallback_to_prior, on the same seeds
    "decision": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"],
                     [f"{P}-decision-seed0-labelled.json", f"{P}-decision-seed1.json"]),
        "realistic_p0.3": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json"],
                           [f"{P}-decision-seed0-realistic.json", f"{P}-decision-seed1.json"]),
    },
    # no LoRA (train_adapter false, fdfffcd): the label prior alone, then the decision offset alone,
    # each against the product's default (nightowl), seeds 0 and 1
    "prior_only": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"],
                     [(f"{P}-offsets.json", "nightowl_prior_only")]),
        "realistic_p0.3": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json"],
                           [(f"{P}-offsets.json", "nightowl_prior_only")]),
    },
    "offsets_only": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"],
                     [(f"{P}-offsets.json", "nightowl_offsets_only")]),
        "realistic_p0.3": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json"],
                           [(f"{P}-offsets.json", "nightowl_offsets_only")]),
    },
    # the gate by folds (gate_folds 5, e60db27) for the no-LoRA rows, each against the same row
    # judged on the held-back posts (fdfffcd), seeds 0 and 1
    "prior_folds": {
        protocol: ([(f"{P}-offsets.json", "nightowl_prior_only")], [(f"{P}-offsets-folds.json", "nightowl_prior_only")])
        for protocol in ("labelled", "realistic_p0.3")
    },
    "offsets_folds": {
        protocol: ([(f"{P}-offsets.json", "nightowl_offsets_only")], [(f"{P}-offsets-folds.json", "nightowl_offsets_only")])
        for protocol in ("labelled", "realistic_p0.3")
    },
    # the fallback of a user on the base by folds (fallback_by_folds, with Tonight.unlearnt) against
    # the product's default, seeds 0 and 1
    "folds_fallback": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"],
                     [(f"{P}-folds-fallback.json", "nightowl_folds_fallback")]),
        "realistic_p0.3": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json"],
                           [(f"{P}-folds-fallback.json", "nightowl_folds_fallback")]),
    },
    # replay's worth in the product's default (doubt_silence): the nightowl row against the LoRA
    # without replay, seeds 0-2, the same code, both realistic protocols
    "replay": {
        "realistic_p0.3": ([(f"{P}-p03-no-replay.json", "lora_no_replay")],
                           [(f"{P}-doubt-silence.json", "nightowl_doubt_silence"),
                            (f"{P}-doubt-silence-seed2.json", "nightowl_doubt_silence")]),
        "realistic_p1": ([(f"{P}-p1.json", "lora_no_replay")], [(f"{P}-p1.json", "nightowl")]),
    },
    # the default provider's rationales (local SmolLM2, one on every feedback post, stored before
    # each night by the product's worker: nightowl_rationales) against the default without them,
    # every post labelled, seeds 0-1 (the third seed and p = 0.3 did not fit in the session)
    "rationales": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json"],
                     [(f"{P}-rationales-labelled.json", "nightowl_rationales")]),
    },
    # the upper reference (one model for all users with a learned embedding per user, trained on
    # every day's feedback at once: joint_annotator_embedding) against the product's default (its
    # one-commit run), every post labelled (the reference has no realistic protocol), seeds 0-2
    "joint": {
        "labelled": ([f"{P}-default.json"], [(f"{P}-joint.json", "joint_annotator_embedding")]),
    },
    # the gate doubting the answers let stand (doubt_silence) against the default before it, seeds
    # 0-2; with every post labelled nothing stands, so only the realistic protocol
    "doubt_silence": {
        "realistic_p0.3": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-realistic.json", f"{P}-fallback-seed2.json"],
                           [(f"{P}-doubt-silence.json", "nightowl_doubt_silence"),
                            (f"{P}-doubt-silence-seed2.json", "nightowl_doubt_silence")]),
    },
    # the product's default measured again in one run at one commit (after) against its earlier
    # runs at several commits (before: the same settings), seeds 0-2: how far a rerun moves it
    "rerun": {
        "labelled": ([f"{P}-fallback-seed0.json", f"{P}-fallback-seed1-labelled.json", f"{P}-fallback-seed2.json"],
                     [f"{P}-default.json"]),
        "realistic_p0.3": ([(f"{P}-doubt-silence.json", "nightowl_doubt_silence"),
                            (f"{P}-doubt-silence-seed2.json", "nightowl_doubt_silence")],
                           [f"{P}-default.json"]),
    },
    # each night's trained change shrunk to the best of five scales on the held-back posts
    # (adapter_scales, row nightowl_shrink) against the product's default's one-commit run, seeds 0-2
    "shrink": {
        protocol: ([f"{P}-default.json"], [(f"{P}-shrink.json", "nightowl_shrink")])
        for protocol in ("labelled", "realistic_p0.3")
    },
}


def _row(path: Path, protocol: str, row: str = "nightowl") -> dict:
    rows = json.loads(path.read_text())["protocols"][protocol]["rows"]
    return next(r for r in rows if r["name"] == row)


def _rows(entries: list, protocol: str) -> list[dict]:
    """The rows an entry list names: a results file (its nightowl row) or (file, row name)."""
    return [_row(RESULTS / e, protocol) if isinstance(e, str) else _row(RESULTS / e[0], protocol, e[1]) for e in entries]


def _per_user_mean(rows: list[dict]) -> dict[str, float]:
    """Each user's gain, averaged over every seed of the runs (each run's per_user_gain is already
    a mean over its own seeds: weighted by how many)."""
    users = rows[0]["per_user_gain"]
    seeds = [len(r["per_seed"]) for r in rows]
    return {u: sum(n * r["per_user_gain"][u] for n, r in zip(seeds, rows)) / sum(seeds) for u in users}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _better_worse(gains: dict[str, float]) -> str:
    return f"{sum(v > 0 for v in gains.values())} / {sum(v < 0 for v in gains.values())}"


def step_table(step: str) -> str:
    """The nightowl row after a step (STEPS) against before it, same users, paired user by user."""
    from benchmarks.personalize import bootstrap_ci  # numpy and torch: only for this table

    lines = [
        "| protocol | gain per seed, after | mean gain after (before) | paired change [95% CI] "
        "| users better / worse after (before) | answers right by day, per seed, after (before) "
        "| s per user-night, per seed, after (before) |",
        "|---|---|---|---|---|---|---|",
    ]
    for protocol, (before_files, after_files) in STEPS[step].items():
        before = _rows(before_files, protocol)
        after = _rows(after_files, protocol)
        b, a = _per_user_mean(before), _per_user_mean(after)
        change = [a[u] - b[u] for u in b]
        lo, hi = bootstrap_ci(change)
        seeds_after = [s for r in after for s in r["per_seed"]]
        seeds_before = [s for r in before for s in r["per_seed"]]
        gains = ", ".join(f"{s['gain_mean']:+.2f}" for s in seeds_after)
        served_after = " / ".join(_pct(s["served_accuracy"]) for s in seeds_after)
        served_before = " / ".join(_pct(s["served_accuracy"]) for s in seeds_before)
        cost_after = " / ".join(_fmt(s["seconds_per_user_night_median"], 1) for s in seeds_after)
        cost_before = " / ".join(_fmt(s["seconds_per_user_night_median"], 1) for s in seeds_before)
        lines.append(
            f"| {protocol} | {gains} | {_mean(a.values()):+.2f} ({_mean(b.values()):+.2f}) | "
            f"{_mean(change):+.2f} [{lo:+.2f}, {hi:+.2f}] | {_better_worse(a)} ({_better_worse(b)}) | "
            f"{served_after} ({served_before}) | {cost_after} ({cost_before}) |"
        )
    return "\n".join(lines)


# The product's default nightly update, every protocol and seed in one run of one commit.
DEFAULT_RUNS = {
    "labelled": [f"{P}-default.json"],
    "realistic_p0.3": [f"{P}-default.json"],
}


def _answers(rows: list[dict]) -> tuple[str, str]:
    """(answers changed vs the base, right among them; seeds' changes alike) and (users clearly
    better / worse) from a run's answers_vs_base; dashes where the runs did not keep answers."""
    stats = rows[0].get("answers_vs_base") if len(rows) == 1 else None
    if not stats:
        return "–", "–"
    right = "–" if stats["changed_right"] is None else f"{100 * stats['changed_right']:.0f}%"
    alike = "–" if stats["seed_correlation"] is None else f"{stats['seed_correlation']:.2f}"
    return (f"{100 * stats['share_changed']:.1f}% ({right} right; seeds alike {alike})",
            f"{stats['users_clearly_better']} / {stats['users_clearly_worse']}")


def default_table() -> str:
    """The nightowl row (the product's default) over all its seeds: each user's gain averaged over
    the seeds, a 95% bootstrap interval over users, users better / worse by that mean, and how its
    test answers differ from the base's (answers_vs_base)."""
    from benchmarks.personalize import bootstrap_ci  # numpy and torch: only for this table

    lines = [
        "| protocol | seeds (commit) | gain per seed | mean gain [95% CI] | users better / worse | "
        "test answers changed vs the base | users clearly better / worse | "
        "answers right by day, per seed | s per user-night, per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for protocol, files in DEFAULT_RUNS.items():
        rows = _rows(files, protocol)
        gains = _per_user_mean(rows)
        lo, hi = bootstrap_ci(list(gains.values()))
        seeds = [s for r in rows for s in r["per_seed"]]
        commits = ", ".join(f"{s} ({json.loads((RESULTS / (f if isinstance(f, str) else f[0])).read_text())['commit']})"
                            for f, r in zip(files, rows) for s in r["seeds"])
        per_seed = ", ".join(f"{s['gain_mean']:+.2f}" for s in seeds)
        changed, clearly = _answers(rows)
        lines.append(
            f"| {protocol} | {commits} | {per_seed} | "
            f"{_mean(gains.values()):+.2f} [{lo:+.2f}, {hi:+.2f}] | {_better_worse(gains)} of {len(gains)} | "
            f"{changed} | {clearly} | "
            f"{' / '.join(_pct(s['served_accuracy']) for s in seeds)} | "
            f"{' / '.join(_fmt(s['seconds_per_user_night_median'], 1) for s in seeds)} |"
        )
    return "\n".join(lines)


def _lat(d: dict) -> str:
    return f"p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms"


def systems_table() -> str:
    """The day side, the FAISS memory, the nightly cost and inference, from their results files."""
    lines = ["| benchmark | figure | on this machine |", "|---|---|---|"]
    ingest = json.loads((RESULTS / "ingest.json").read_text())
    modes = {"group": "group commit (default)", "per_request": "per-request commit"}
    for i, r in enumerate(ingest["feedback_ingest"]):
        ratio = f", {r['x_per_request']:.1f}x per-request" if "x_per_request" in r else ""
        store = "" if r.get("store", "sqlite") == "sqlite" else " on PostgreSQL"
        where = store if r["workers"] == 1 and not store else f"{store}, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        lines.append(f"| {'`benchmarks.ingest`' if i == 0 else ''} | durable feedback ingest{where}, {modes[r['commit']]}, "
                     f"{r['clients']} client{'s' if r['clients'] > 1 else ''} | {r['events_per_s']:.1f} events/s "
                     f"({_lat(r['latency'])}){ratio}, {r['errors']} errors |")
    if ingest.get("kill9"):
        k = ingest["kill9"]
        workers = k.get("workers", 1)
        lines.append(f"| | kill -9 of the server ({workers} worker{'s' if workers > 1 else ''}) under load ({k['clients']} clients), {k['trials']} trials | "
                     f"{k['acknowledged']:,} acknowledged: {k['lost']} lost, {k['stored_twice']} stored twice |")
    lines.append(f"| | post latency, text (prediction included) | {_lat(ingest['post_latency_text'])} |")
    lines.append(f"| | post latency, with a 224 px image | {_lat(ingest['post_latency_with_image'])} |")
    faiss = json.loads((RESULTS / "faiss_memory.json").read_text())
    for r in faiss["rows"]:
        lines.append(f"| `benchmarks.faiss_memory` | {r['vectors']:,} vectors ({r['dim']}-d) | add {r['add_s']:.3f} s; "
                     f"1-query search p50 {r['search_1_query_p50_ms']:.1f} ms; {r['bytes_per_example']:.0f} bytes/example |")
    for name in ("nightly_cost_cpu", "nightly_cost_gpu"):
        path = RESULTS / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            lines.append(f"| `benchmarks.nightly_cost` ({r['device']}) | one user's night, {r['new_feedback_per_user']} new "
                         f"feedback + replay, gate included | median {r['seconds_per_user_median']:.1f} s; "
                         f"{r['users_per_hour']:.0f} users/hour |")
    inf = json.loads((RESULTS / "inference.json").read_text())
    lines += [
        f"| `benchmarks.inference` | base model | {_lat(inf['base_model'])} |",
        f"| | warm adapter | {_lat(inf['warm_adapter'])} |",
        f"| | with an adapter load | {_lat(inf['adapter_load'])} |",
        f"| | {inf['users_cycling']['users']:,} users through a cache of {inf['users_cycling']['cache']} "
        f"(hit rate {100 * inf['users_cycling']['hit_rate']:.0f}%) | {_lat(inf['users_cycling'])} |",
        f"| | one user adapter on disk | {inf['adapter_bytes']:,} bytes |",
    ]
    broker = RESULTS / "ingest_broker.json"
    if broker.exists():
        r = json.loads(broker.read_text())
        t, lat, k = r["throughput"], r["latency"], r["kill9"]
        lines += [
            f"| `benchmarks.ingest_broker` | durable consume from NATS JetStream, {t['events']:,} feedback | "
            f"{t['events_per_s']:,} events/s, {t['duplicates']} stored twice |",
            f"| | publish -> acked (the ack follows the commit) at {lat['rate_per_s']:.0f}/s offered | p50 {lat['p50_ms']:.1f} ms, "
            f"p99 {lat['p99_ms']:.1f} ms |",
            f"| | kill -9 of the consumer under load, {k['trials']} trials | {k['lost']} lost, "
            f"{k['stored_twice']} stored twice |",
        ]
    memory = RESULTS / "request_memory.json"
    if memory.exists():
        rows = json.loads(memory.read_text())["rows"]
        for key, what in (("png_posts", "PNG"), ("jpeg_posts", "JPEG")):
            r = rows[key]
            name = "`benchmarks.request_memory`" if key == "png_posts" else ""
            lines.append(f"| {name} | {r['requests']} concurrent {r['megapixels']:.0f} MP {what} posts | "
                         f"server +{r['added_mb']} MB peak; statuses {r['statuses']} |".replace("|  |", "| |"))
        r = rows["unauthenticated_bodies"]
        lines.append(f"| | {r['requests']} concurrent unauthenticated {r['body_mb']:.0f} MB bodies | "
                     f"server +{r['added_mb']} MB peak; statuses {r['statuses']} |")
    return "\n".join(lines)


POWER_GAINS = (2.0, 3.0, 5.0, 8.0, 10.0, 15.0)


def _alike(rho: float) -> str:
    return {0.0: "independently", 1.0: "the same posts"}.get(rho, f"alike {rho:g}")


def power_table(path: Path = RESULTS / "power-multipico_en-24.json", gains: tuple | None = POWER_GAINS) -> str:
    """benchmarks.power: the shares of users a true gain shows as better / worse on the users'
    own test sets, by how often the model's changed answers are right and how alike the seeds are."""
    data = json.loads(path.read_text())
    facts = data["test_sets"]
    head = (f"{data['n_users']} users ({data['users_rule']}); test posts per user median "
            f"{facts['test_posts_median']:g} ({facts['test_posts_min_max'][0]}-{facts['test_posts_min_max'][1]}), "
            f"the rarer label's median {facts['rarest_label_posts_median']:g}; base macro-F1 {facts['base_macro_f1_mean']:.2f}; "
            f"{data['seeds']} seeds a user, {data['draws']} simulated measurements a cell; `{data['command']}`. "
            "Each cell: users measured better / worse, expected share.")
    gains = [g for g in (gains or data["gains"]) if g in data["gains"]]
    lines = [head, "",
             "| changed answers right | seeds change | " + " | ".join(f"true gain +{g:g}" for g in gains)
             + " | smallest true gain meeting 80% / 5% |",
             "|---|---|" + "---|" * (len(gains) + 1)]
    for precision in data["precisions"]:
        for rho in data["seed_correlations"]:
            cells = {c["true_gain"]: c for c in data["cells"] if c["precision"] == precision and c["seed_correlation"] == rho}
            smallest = data["smallest_gain_meeting_share_targets"][f"precision {precision:g}, seed correlation {rho:g}"]
            lines.append(
                f"| {precision:.0%} | {_alike(rho)} | "
                + " | ".join(f"{cells[g]['share_better']:.0%} / {cells[g]['share_worse']:.0%}" for g in gains)
                + f" | {'none up to +' + format(max(data['gains']), 'g') if smallest is None else '+' + format(smallest, 'g')} |")
    return "\n".join(lines)


TABLES = {
    "twitter2015": twitter2015_table,
    "personalize": personalize_table,
    # every post labelled, run separately this time (two seeds fitted in the session): the main
    # file holds the realistic protocol
    "personalize_labelled": lambda: personalize_table(RESULTS / "personalization-multipico_en-labelled.json"),
    # the realistic protocol with every wrong answer corrected (p = 1.0), three seeds
    "personalize_p1": lambda: personalize_table(RESULTS / f"{P}-p1.json"),
    # the default's one-commit run as a full table (forgetting, BWT, labels per user)
    "personalize_default": lambda: personalize_table(RESULTS / f"{P}-default.json"),
    # the default on every eligible user (72) at p = 0.3, two seeds: the 24 users' figures checked
    # on the other 48
    "personalize_all": lambda: personalize_table(RESULTS / f"{P}-default-all.json"),
    "systems": systems_table,
    "fallback": lambda: step_table("fallback"),
    "decision": lambda: step_table("decision"),
    "default": default_table,
    "prior_only": lambda: step_table("prior_only"),
    "offsets_only": lambda: step_table("offsets_only"),
    "prior_folds": lambda: step_table("prior_folds"),
    "offsets_folds": lambda: step_table("offsets_folds"),
    "folds_fallback": lambda: step_table("folds_fallback"),
    "doubt_silence": lambda: step_table("doubt_silence"),
    "replay": lambda: step_table("replay"),
    "rationales": lambda: step_table("rationales"),
    "joint": lambda: step_table("joint"),
    "rerun": lambda: step_table("rerun"),
    "shrink": lambda: step_table("shrink"),
    "personalize_shrink": lambda: personalize_table(RESULTS / f"{P}-shrink.json"),
    "personalize_no_replay": lambda: personalize_table(RESULTS / f"{P}-no-replay.json"),
    "power": power_table,
    "power_all": lambda: power_table(RESULTS / "power-multipico_en.json"),
    "power_measured": lambda: power_table(RESULTS / "power-multipico_en-24-measured.json", gains=None),
}


def render(name: str) -> str | None:
    try:
        return TABLES[name]()
    except FileNotFoundError:
        return None


def rewrite_readme(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    done = []
    for name in TABLES:
        table = render(name)
        if table is None:
            continue
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + table + "\n" + m.group(2), text)
        if n:
            done.append(name)
    atomic_write_text(readme, text)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true", help="rewrite the tables in README.md")
    args = ap.parse_args()
    if args.readme:
        print("rewrote:", ", ".join(rewrite_readme()) or "nothing")
        return
    for name in TABLES:
        table = render(name)
        print(f"## {name}\n\n{table or '(no results file yet)'}\n")


if __name__ == "__main__":
    main()
