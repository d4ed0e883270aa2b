"""The night side end to end: a real nightly update personalizes, gates, persists and recovers."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from peft import PeftModel
from sqlmodel import Session, func, select

from nightowl.adapters import registry
from nightowl.adapters.inputs import ModelInput
from nightowl.continual.night import run_night
from nightowl.day import logger
from nightowl.errors import NotFound
from nightowl.memory.models import (
    AdapterStatus,
    AdapterVersion,
    Feedback,
    RunStatus,
    TrainingRun,
)
from nightowl.memory.models import utcnow
from nightowl.runtime import Runtime
from nightowl.settings import UpdateConfig
from tests.conftest import make_settings

# A user who calls every sarcastic "great"/"love" post negative; the base model reads them as positive.
SARCASTIC_TRAIN = [
    "Great, another Monday. Just what I needed",
    "I just love being stuck in traffic for two hours",
    "Oh great, the printer is jammed again",
    "Fantastic, my flight got delayed again",
    "Love it when the wifi dies during a meeting",
    "Wonderful, it is raining on my day off",
    "Great job breaking the build again, team",
    "I love waiting on hold for an hour",
    "Perfect, I spilled coffee on my laptop",
    "Awesome, the bus left without me",
    "Brilliant, the train is cancelled again",
    "Oh wonderful, more homework for the weekend",
    "Great, my phone died right before the call",
    "Just lovely, the heating broke in January",
    "Amazing, another parking ticket today",
    "Super, the shop closed five minutes early",
]
SARCASTIC_TEST = [
    "Great, the elevator is broken again",
    "I love it when my code crashes on a Friday",
    "Fantastic, the dishwasher flooded the kitchen",
    "Oh great, another meeting that could have been an email",
]


@pytest.fixture
def night_rt(tmp_path, predictor):
    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    rt.update_config = UpdateConfig(epochs=8, n_global=8)
    yield rt
    rt.close()


def _teach(rt, user, texts, label, aspect=None):
    for t in texts:
        post = logger.log_post(rt, user, t, aspect=aspect)
        logger.log_feedback(rt, user, post.post_id, label, "sarcasm", f"{user}-{t}")


def _p(rt, user, text, label):
    out = logger.log_post(rt, user, text)
    return out.prediction.probabilities[label], out.prediction.adapter_version


def test_one_night_personalizes_without_forgetting(night_rt):
    rt = night_rt
    logger.create_user(rt, "sarcastic")
    logger.create_user(rt, "plain")
    before = [_p(rt, "sarcastic", t, "negative")[0] for t in SARCASTIC_TEST]
    _teach(rt, "sarcastic", SARCASTIC_TRAIN, "negative")

    summary = run_night(rt)
    assert summary.counts() == {"promoted": 1}
    result = summary.results[0]
    assert result.adapter_version == 1 and result.metrics["replay"]["kind"] == "faiss"

    after = [_p(rt, "sarcastic", t, "negative") for t in SARCASTIC_TEST]
    assert all(v == 1 for _, v in after)  # the answer says which adapter served it
    gained = sum(a > b for (a, _), b in zip(after, before))
    assert gained >= 3, f"negative prob before {before}, after {[a for a, _ in after]}"
    assert sum(a for a, _ in after) / len(after) > sum(before) / len(before) + 0.15
    # The other user still gets the base model.
    assert _p(rt, "plain", SARCASTIC_TEST[0], "negative")[1] is None

    # Night 2 teaches something else; lesson 1 must survive (replay + avalanche metrics recorded).
    _teach(rt, "sarcastic", ["The new library opened downtown", "Election results were announced today",
                             "The museum is open until six", "Our office moved to the third floor",
                             "The bakery sells bread and cakes"], "neutral")
    summary2 = run_night(rt)
    r2 = summary2.results[0]
    assert r2.status in (RunStatus.promoted, RunStatus.rejected)
    assert r2.metrics["forgetting"] and r2.metrics["bwt"]  # computed on night 1's experience
    still = [_p(rt, "sarcastic", t, "negative")[0] for t in SARCASTIC_TEST]
    assert sum(still) / len(still) > sum(before) / len(before) + 0.15

    # Nothing new: nobody to train.
    assert run_night(rt).results == []


def test_adapter_loads_with_plain_peft_and_matches_server(night_rt, tmp_path):
    from nightowl.adapters.predictor import load_base_model

    rt = night_rt
    logger.create_user(rt, "exp")
    _teach(rt, "exp", SARCASTIC_TRAIN[:8], "negative")
    assert run_night(rt).counts() == {"promoted": 1}
    out = logger.export_adapter(rt, "exp", None, tmp_path / "export")
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    plain = PeftModel.from_pretrained(load_base_model(rt.predictor.model_dir, rt.settings), tmp_path / "export")
    plain.eval()
    text = SARCASTIC_TEST[0]
    served = logger.log_post(rt, "exp", text).prediction
    assert served.adapter_version == out["version"]
    with torch.inference_mode():
        probs = rt.predictor.probabilities_with(plain, text, None, None)
    for label, p in served.probabilities.items():
        assert p == pytest.approx(probs[label], abs=1e-4)


def test_broken_or_foreign_adapter_serves_the_base(night_rt):
    """An adapter whose tensors don't fit the slot, or one trained over another base model, must
    not take a user's posts down: the base answers and says so; the next night starts afresh."""
    from safetensors.torch import load_file, save_file

    rt = night_rt
    rt.update_config = UpdateConfig(epochs=1, n_global=0, min_examples_for_holdout=100)
    for user in ("bent", "moved"):
        logger.create_user(rt, user)
        _teach(rt, user, SARCASTIC_TRAIN[:4], "negative")
    assert run_night(rt).counts() == {"promoted": 2}
    text = SARCASTIC_TEST[0]
    assert logger.log_post(rt, "bent", text).prediction.adapter_version == 1

    with Session(rt.engine) as s:
        path = rt.settings.adapters_dir / registry.active(s, "bent").path / "adapter_model.safetensors"
    weights = load_file(str(path))
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.zeros(1, 1)  # same file layout, wrong shape
    save_file(weights, str(path))
    served = logger.log_post(rt, "bent", text).prediction
    assert served.adapter_version is None
    base = rt.predictor.predict(text, None, None)
    assert served.probabilities == pytest.approx(base.probabilities, abs=1e-5)
    assert logger.log_post(rt, "moved", text).prediction.adapter_version == 1  # the slot still works

    with Session(rt.engine) as s:
        row = registry.active(s, "moved")
        row.metrics = {**row.metrics, "base_model": "fused-another-base"}
        s.add(row)
        s.commit()
    assert logger.log_post(rt, "moved", text).prediction.adapter_version is None
    _teach(rt, "moved", SARCASTIC_TRAIN[4:5], "negative")
    result = next(r for r in run_night(rt).results if r.user_id == "moved")
    assert result.metrics["n_new"] == 5  # all of the user's feedback, not just tonight's one
    assert result.metrics["base_model"] == rt.predictor.encoder_id


@pytest.mark.filterwarnings("ignore:No loggers specified")  # a bare strategy: no metrics wanted
def test_anchored_ewc_and_lwf_hold_the_model_near_its_start(night_rt):
    """Both regularizers act within a single night (avalanche's own anchor would come only
    after a first experience of the same strategy object): the outputs move less."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from nightowl.continual.experiences import ExampleTable, IndexedModel
    from nightowl.continual.regularizers import AnchoredEWC, anchored_lwf
    from nightowl.memory.examples import Example

    kit = night_rt.personal
    examples = [Example(id=i + 1, text=t, aspect=None, label="negative") for i, t in enumerate(SARCASTIC_TRAIN[:8])]
    neg = kit.labels.index("negative")

    def output_change(make_plugins) -> float:
        torch.manual_seed(0)
        table = ExampleTable()
        ds = table.dataset(examples, kit.labels)
        model = IndexedModel(kit.trainable(None), table, kit)
        idx = torch.arange(len(examples))
        model.eval()
        with torch.no_grad():
            before = model(idx).softmax(-1)[:, neg]
        plugins = make_plugins(model, ds)
        params = [p for p in model.parameters() if p.requires_grad]
        strategy = Naive(model=model, optimizer=torch.optim.AdamW(params, lr=3e-3), criterion=torch.nn.CrossEntropyLoss(),
                         train_mb_size=4, train_epochs=3, device=kit.device, plugins=plugins,
                         evaluator=EvaluationPlugin(loggers=[]))
        strategy.train(benchmark_from_datasets(train=[ds], test=[ds]).train_stream[0])
        model.eval()
        with torch.no_grad():
            after = model(idx).softmax(-1)[:, neg]
        return float((after - before).abs().mean())

    free = output_change(lambda m, ds: [])
    ewc = output_change(lambda m, ds: [AnchoredEWC(1e6, m, ds, kit.device, 4)])
    lwf = output_change(lambda m, ds: [anchored_lwf(m, alpha=50.0)])
    assert free > 0.1, free
    assert ewc < 0.6 * free and lwf < 0.6 * free, (free, ewc, lwf)


def _head_bias(rt, user):
    with Session(rt.engine) as s:
        row = registry.active(s, user)
    # A copy: from_pretrained injects LoRA layers into the model it is given, and the pristine
    # base is shared by every test in the session.
    model = PeftModel.from_pretrained(copy.deepcopy(rt.predictor.pristine), rt.settings.adapters_dir / row.path)
    bias = next(m for n, m in model.named_modules() if n.endswith("head.modules_to_save.default")).bias
    return bias.detach().clone(), row.metrics["logit_adjustment"]


def test_prior_correction_is_folded_into_the_head_once(tmp_path, predictor):
    """The user's label prior goes into their head's bias, replacing (not adding to) last night's
    (the decision offset off: the prior as it is served; test_decision_offset_... covers it on)."""
    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    # no learning: bookkeeping only
    rt.update_config = UpdateConfig(epochs=1, lr=0.0, n_global=0, min_examples_for_holdout=100, decision_offset=False)
    base_bias = predictor.pristine.head.bias.detach().clone()
    prior = predictor.config.training["label_prior"]
    logger.create_user(rt, "neg")
    _teach(rt, "neg", SARCASTIC_TRAIN[:10], "negative")
    assert run_night(rt).counts() == {"promoted": 1}
    bias1, adj1 = _head_bias(rt, "neg")
    # 10 of 10 labels negative, smoothed by 5 pseudo-counts of the base prior
    neg = rt.labels.index("negative")
    assert adj1[neg] == pytest.approx(math.log((10 + 5 * prior[neg]) / 15 / prior[neg]))
    assert adj1[neg] > 0 and all(a < 0 for i, a in enumerate(adj1) if i != neg)
    assert torch.allclose(bias1, base_bias + torch.tensor(adj1), atol=1e-5)

    _teach(rt, "neg", SARCASTIC_TRAIN[10:], "negative")
    assert run_night(rt).counts() == {"promoted": 1}
    bias2, adj2 = _head_bias(rt, "neg")
    assert adj2[neg] > adj1[neg]  # 16 labels now: the prior moves further from the base's
    assert torch.allclose(bias2, base_bias + torch.tensor(adj2), atol=1e-5)
    rt.close()


def test_decision_offset_moves_the_served_offset_from_the_prior(tmp_path, predictor):
    """The served offset is the prior moved to where the base's answers score best on the user's
    labels by the gate's metric; it is what the head carries (and what the next night takes out)."""
    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    rt.update_config = UpdateConfig(epochs=1, lr=0.0, n_global=0, min_examples_for_holdout=100, decision_offset=True, decision_penalty=0.0)
    base_bias = predictor.pristine.head.bias.detach().clone()
    logger.create_user(rt, "dec")
    _teach(rt, "dec", SARCASTIC_TRAIN[:12], "negative")
    result = run_night(rt).results[0]
    assert result.status == RunStatus.promoted
    bias, served = _head_bias(rt, "dec")
    prior = result.metrics["label_prior"]
    assert torch.allclose(bias, base_bias + torch.tensor(served), atol=1e-5)
    # every label "negative": with no pull towards the prior, the offset moves until the base
    # answers "negative" to all twelve (or stays, if the prior already makes it so)
    with torch.inference_mode():
        items = [ModelInput(t, None, None, None, None) for t in SARCASTIC_TRAIN[:12]]
        logits = predictor.pristine(**predictor.batcher(items))
    neg = rt.labels.index("negative")
    right = {name: int((logits + torch.tensor(o)).argmax(-1).eq(neg).sum()) for name, o in (("prior", prior), ("served", served))}
    assert right["served"] >= right["prior"], right
    assert right["served"] == 12 or served != prior, right  # it moved, unless the prior already answers all twelve
    rt.close()


def test_without_training_the_night_refits_only_the_offsets(tmp_path, predictor):
    """`train_adapter=False`: nothing is learnt (a high learning rate would show it); the served
    model is the base with the user's offset in its head, and it answers as the base plus that
    offset. A second night replaces the offset rather than adding to it."""
    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    rt.update_config = UpdateConfig(train_adapter=False, epochs=4, lr=0.05, n_global=0, min_examples_for_holdout=100)
    base = predictor.pristine
    logger.create_user(rt, "off")
    for night, texts in enumerate((SARCASTIC_TRAIN[:8], SARCASTIC_TRAIN[8:])):
        _teach(rt, "off", texts, "negative")
        result = run_night(rt).results[0]
        assert result.status == RunStatus.promoted and result.metrics["candidate_kind"] == "offsets_only"
        with Session(rt.engine) as s:
            row = registry.active(s, "off")
        model = PeftModel.from_pretrained(copy.deepcopy(base), rt.settings.adapters_dir / row.path)
        head = next(m for n, m in model.named_modules() if n.endswith("head.modules_to_save.default"))
        offset = torch.tensor(result.metrics["logit_adjustment"])
        assert torch.equal(head.weight, base.head.weight)
        assert torch.allclose(head.bias, base.head.bias + offset, atol=1e-5)
        with torch.inference_mode():
            batch = predictor.batcher([ModelInput(t, None, None, None, None) for t in SARCASTIC_TEST])
            served, plain = model(**batch), base(**batch)
        assert torch.allclose(served, plain + offset, atol=1e-4), night
    rt.close()


def test_prior_counts_the_answers_a_user_let_stand(tmp_path, predictor):
    """Feedback is mostly correction: posts the user never corrected count with the answer served."""
    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    rt.update_config = UpdateConfig(epochs=1, lr=0.0, n_global=0, min_examples_for_holdout=100)
    logger.create_user(rt, "mild")
    served = [logger.log_post(rt, "mild", t).prediction.label for t in SARCASTIC_TEST + ["The museum is open until six"]]
    _teach(rt, "mild", SARCASTIC_TRAIN[:4], "negative")
    result = run_night(rt).results[0]
    assert result.status == RunStatus.promoted
    adj = result.metrics["label_prior"]
    prior = predictor.config.training["label_prior"]
    labels = served + ["negative"] * 4
    expected = [math.log((labels.count(lab) + 5 * p) / (len(labels) + 5) / p) for lab, p in zip(rt.labels, prior)]
    assert adj == pytest.approx(expected)
    rt.close()


def test_rollback_and_failure_isolation(night_rt):
    rt = night_rt
    for u in ("a1", "a2"):
        logger.create_user(rt, u)
        _teach(rt, u, SARCASTIC_TRAIN[:6], "negative")

    from nightowl.continual.update import update_user

    def flaky(rt_, job):
        if job.user_id == "a1":
            raise RuntimeError("disk full (simulated)")
        return update_user(rt_, job)

    stop = threading.Event()
    stop.set()  # a server shutting down: nobody starts, everybody is left for the next night
    skipped = run_night(rt, stop=stop)
    assert {r.user_id: r.status for r in skipped.results} == {"a1": RunStatus.skipped, "a2": RunStatus.skipped}

    summary = run_night(rt, update=flaky)
    status = {r.user_id: r.status for r in summary.results}
    assert status == {"a1": RunStatus.failed, "a2": RunStatus.promoted}
    # a1's work is redone by the next night.
    assert {r.user_id: r.status for r in run_night(rt).results} == {"a1": RunStatus.promoted}

    listing = logger.list_adapters(rt, "a2")
    assert listing.active_version == 1
    back = logger.rollback_adapter(rt, "a2", None)
    assert back.active_version is None
    assert logger.log_post(rt, "a2", "hello").prediction.adapter_version is None
    again = logger.rollback_adapter(rt, "a2", 1)
    assert again.active_version == 1
    assert logger.log_post(rt, "a2", "hello").prediction.adapter_version == 1
    with pytest.raises(Exception):
        logger.rollback_adapter(rt, "a2", 99)


def test_delete_user_removes_rows_vectors_adapters(night_rt):
    rt = night_rt
    logger.create_user(rt, "gone")
    _teach(rt, "gone", SARCASTIC_TRAIN[:5], "negative")
    run_night(rt)
    memory_file = rt.replay_memory.user_path("gone")
    adapter_dir = registry.user_dir(rt.settings.adapters_dir, "gone")
    assert memory_file.exists() and adapter_dir.exists()
    logger.delete_user(rt, "gone")
    assert not memory_file.exists() and not adapter_dir.exists()
    with Session(rt.engine) as s:
        assert s.exec(select(func.count()).select_from(Feedback).where(Feedback.user_id == "gone")).one() == 0
        assert s.exec(select(func.count()).select_from(AdapterVersion).where(AdapterVersion.user_id == "gone")).one() == 0


def test_a_user_recreated_during_the_night_gets_nothing_trained_on_the_old_one(tmp_path, predictor, monkeypatch):
    """Issue 12, case 2: the user is deleted and recreated (same id, another person) while the
    night trains on the first one's labels: no version is written for the new one, and there is
    nothing to roll back to."""
    from nightowl.continual import update as update_module

    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    rt.update_config = UpdateConfig(epochs=1, n_global=0, min_examples_for_holdout=100)
    logger.create_user(rt, "dee")
    _teach(rt, "dee", SARCASTIC_TRAIN[:5], "negative")
    train_candidate = update_module.train_candidate

    def recreate_then_train(*args, **kwargs):
        logger.delete_user(rt, "dee")
        logger.create_user(rt, "dee")
        return train_candidate(*args, **kwargs)

    monkeypatch.setattr(update_module, "train_candidate", recreate_then_train)
    [result] = run_night(rt).results
    assert result.status == RunStatus.skipped and "deleted during the night" in result.error
    assert logger.list_adapters(rt, "dee").items == []
    assert rt.active_adapter("dee") is None
    with pytest.raises(NotFound):
        logger.rollback_adapter(rt, "dee", 1)
    assert not registry.user_dir(rt.settings.adapters_dir, "dee").exists()
    rt.close()


def test_kill_9_during_nightly_changes_nothing(tmp_path, predictor):
    """A killed night leaves every active adapter as it was and loses no feedback; the next run finishes."""
    home = tmp_path / "home"
    rt = Runtime(make_settings(home), predictor=predictor)
    logger.create_user(rt, "k")
    _teach(rt, "k", SARCASTIC_TRAIN[:6], "negative")
    assert run_night(rt).counts() == {"promoted": 1}
    _teach(rt, "k", SARCASTIC_TRAIN[6:], "negative")
    with Session(rt.engine) as s:
        n_feedback = s.exec(select(func.count()).select_from(Feedback)).one()
        active_before = registry.active(s, "k").version

    # A night long enough that the kill lands in it: on an idle machine a default night over these
    # few posts can finish within the second this test waits (it did once, CI of 805a9a5).
    env = {**os.environ, "NIGHTOWL_HOME": str(home), "NIGHTOWL_RATIONALE_PROVIDER": "none", "NIGHTOWL_ADMIN_TOKEN": "x",
           "NIGHTOWL_UPDATE__EPOCHS": "500"}
    proc = subprocess.Popen([sys.executable, "-m", "nightowl.cli", "nightly", "--now"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once it is training (its run row exists)
        with Session(rt.engine) as s:
            if s.exec(select(TrainingRun).where(TrainingRun.status == RunStatus.running)).first():
                break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    with Session(rt.engine) as s:
        assert s.exec(select(func.count()).select_from(Feedback)).one() == n_feedback
        assert registry.active(s, "k").version == active_before
    # The killed run's lease names a dead process on this host: the next run takes it over.
    summary = run_night(rt)
    assert summary.counts() == {"promoted": 1}
    with Session(rt.engine) as s:
        interrupted = s.exec(select(TrainingRun).where(TrainingRun.error.contains("interrupted"))).all()
        assert len(interrupted) == 1
        assert registry.active(s, "k").version > active_before


def test_scheduler_persists_one_job(tmp_path):
    """One fixed job per server, rebuilt at every start, and nothing of it in the database (issue
    12, case 8: a stored job is a pickle every server would unpickle)."""
    from sqlalchemy import inspect

    from nightowl.scheduler.nightly import JOB_ID, MISFIRE_GRACE_S, build_scheduler

    rt = Runtime(make_settings(tmp_path / "home", nightly_time="03:15"))
    for _ in range(2):  # a restart builds the same single job again
        sched = build_scheduler(rt)
        sched.start(paused=True)
        jobs = sched.get_jobs()
        assert [j.id for j in jobs] == [JOB_ID]
        job = jobs[0]
        assert job.coalesce and job.max_instances == 1 and job.misfire_grace_time == MISFIRE_GRACE_S
        assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 15)
        sched.shutdown(wait=False)
    assert "apscheduler_jobs" not in inspect(rt.engine).get_table_names()
    rt.close()


def test_a_nights_encoder_states_give_the_models_own_answers(night_rt):
    """Reused encoder states (a per-user adapter leaves the encoder alone) change nothing: the
    logits and the replay vectors equal those of a full forward."""
    from nightowl.adapters.personal import adapts_encoder
    from nightowl.memory.examples import Example

    kit = night_rt.personal
    examples = [Example(i + 1, t, None, "negative", context="how was it?" if i % 2 else None)
                for i, t in enumerate(SARCASTIC_TEST + SARCASTIC_TRAIN[:4])]
    model = kit.trainable(None).eval()
    assert not adapts_encoder(model)  # the default per-user LoRA: fusion layers and head only
    with torch.no_grad():
        direct, vectors = kit.logits(model, examples), kit.embed(examples)
        with kit.frozen_encoder_states() as states:
            reused = kit.logits(model, examples[:3]), kit.logits(model, examples)
            assert len(states) == len(examples)  # each post encoded once
            reused_vectors = kit.embed(examples)
    assert torch.allclose(reused[1], direct, atol=1e-5) and torch.allclose(reused[0], direct[:3], atol=1e-5)
    assert abs(reused_vectors - vectors).max() < 1e-5


def test_held_back_posts_are_the_same_every_night_and_never_trained_on(night_rt):
    from nightowl.continual.update import is_held_back
    from nightowl.memory.examples import Example

    held = [pid for pid in range(1, 2001) if is_held_back("u", Example(9, "t", None, "x", post_id=pid), 0.2)]
    assert 0.17 < len(held) / 2000 < 0.23  # about the configured share
    # keyed by the post: a relabelling (a new feedback id) keeps a post where it was
    assert all(is_held_back("u", Example(fid, "t", None, "y", post_id=held[0]), 0.2) for fid in (1, 50, 7000))
    assert not is_held_back("u", Example(-1, "t", None, "x"), 0.2)  # global examples are never held back

    rt = night_rt
    rt.update_config = UpdateConfig(epochs=1, n_global=0, gate_folds=0)  # folds judge a fallback on every post
    logger.create_user(rt, "h")
    _teach(rt, "h", SARCASTIC_TRAIN, "negative")
    first = run_night(rt).results[0]
    _teach(rt, "h", SARCASTIC_TEST, "negative")
    second = run_night(rt).results[0]
    # the gate judged on held-back posts only, against the base as well from night 2 on
    assert first.metrics["n_holdout"] >= 1 and first.metrics["gate_size"] == first.metrics["n_holdout"]
    assert second.metrics["n_holdout"] >= first.metrics["n_holdout"]  # the held-back share only grows
    assert first.metrics["n_train_new"] + first.metrics["n_holdout"] == len(SARCASTIC_TRAIN)
    if second.adapter_version and first.status == RunStatus.promoted:
        assert "gate_base_macro_f1" in second.metrics


def test_sign_test_needs_a_margin_over_the_base():
    from nightowl.continual.gate import sign_test

    neg, pos = 0, 2
    gold = [neg] * 6
    # the candidate is right on 3 posts the base gets wrong, and wrong on none it gets right
    wins3 = sign_test(gold, [neg] * 6, [pos, pos, pos, neg, neg, neg], z=1.0)
    assert (wins3["wins"], wins3["losses"], wins3["passed"]) == (3, 0, True)  # 3 >= sqrt(3)
    # 2 against 1: 1 < sqrt(3), not enough; nor are no disagreements at all
    two_one = sign_test(gold, [neg, neg, pos, neg, neg, neg], [pos, pos, neg, neg, neg, neg], z=1.0)
    assert (two_one["wins"], two_one["losses"], two_one["passed"]) == (2, 1, False)
    assert not sign_test(gold, [neg] * 6, [neg] * 6, z=1.0)["passed"]
    assert sign_test(gold, [neg] * 6, [neg] * 6, z=0.0)["passed"]  # z = 0: the metric decides alone


def test_a_candidate_no_different_from_the_base_is_not_promoted(night_rt):
    """Nothing learned (lr 0, no prior): 'not worse' holds, but there is no evidence to leave the base."""
    rt = night_rt
    rt.update_config = UpdateConfig(epochs=1, lr=0.0, prior_strength=0.0, min_examples_for_holdout=1, holdout_fraction=0.5)
    logger.create_user(rt, "same")
    _teach(rt, "same", SARCASTIC_TRAIN, "negative")
    result = run_night(rt).results[0]
    evidence = result.metrics["gate_evidence"]
    assert result.status == RunStatus.rejected and evidence == {"wins": 0, "losses": 0, "z": 1.0, "passed": False}
    assert result.metrics["gate_candidate_macro_f1"] == result.metrics["gate_active_macro_f1"]  # tied with the base
    with Session(rt.engine) as s:
        row = s.exec(select(AdapterVersion).where(AdapterVersion.user_id == "same")).one()
        assert registry.active(s, "same") is None and "not enough evidence against the base" in row.reason


def test_answers_let_stand_are_trained_on_and_join_the_gates_evidence(night_rt):
    """Posts served and never corrected: the latest are trained on (at most standing_ratio per new
    label), the held-back ones are gate evidence, and none of them is both."""
    from nightowl.continual.update import is_held_back
    from nightowl.memory import night_queries

    rt = night_rt
    rt.update_config = UpdateConfig(epochs=1, standing_ratio=1.0, holdout_fraction=0.3, min_examples_for_holdout=1)
    logger.create_user(rt, "quiet")
    silent = [logger.log_post(rt, "quiet", t) for t in SARCASTIC_TEST + SARCASTIC_TRAIN[8:]]  # answers left standing
    _teach(rt, "quiet", SARCASTIC_TRAIN[:8], "negative")
    with Session(rt.engine) as s:
        standing = night_queries.standing_answers(s, "quiet", utcnow(), 10**9)
    assert [e.post_id for e in standing] == [p.post_id for p in silent]  # oldest first, no feedback among them
    assert [e.label for e in standing] == [p.prediction.label for p in silent] and {e.id for e in standing} == {0}

    held_labels = sum(is_held_back("quiet", e, 0.3) for e in night_queries_examples(rt, "quiet"))
    held_standing = sum(is_held_back("quiet", e, 0.3) for e in standing)
    result = run_night(rt).results[0]
    m = result.metrics
    assert m["n_holdout"] == m["gate_size"] == held_labels + held_standing and held_standing > 0
    assert m["n_train_new"] == 8 - held_labels
    assert m["n_train_standing"] == min(m["n_train_new"], len(standing) - held_standing)
    # doubted by default: at most the base's error rate x the gate's posts spread over the answers let stand
    assert 0 <= m["gate_silence_doubt"] <= min(0.5, rt.personal.base_error * m["gate_size"] / held_standing) + 1e-9

    rt.update_config = UpdateConfig(epochs=1, standing_ratio=0.0, holdout_fraction=0.3, min_examples_for_holdout=1)
    _teach(rt, "quiet", SARCASTIC_TRAIN[8:10], "negative")
    off = run_night(rt).results[0].metrics
    assert off["n_train_standing"] == 0 and off["gate_size"] == off["n_holdout"] and off["gate_silence_doubt"] == 0
    assert off["n_holdout"] == sum(is_held_back("quiet", e, 0.3) for e in night_queries_examples(rt, "quiet"))


def night_queries_examples(rt, user):
    from nightowl.memory import night_queries

    with Session(rt.engine) as s:
        return night_queries.user_examples(s, user)


def test_an_adapter_the_base_now_beats_sends_the_user_back_to_the_base(night_rt):
    """The held-back evidence grows: when it shows the base right where the user's adapter is
    wrong (clearly, by the same sign test), a night that promotes nothing puts the user back on
    the base, and says why."""
    rt = night_rt
    rt.update_config = UpdateConfig(epochs=8, gate_evidence_z=0.0, min_examples_for_holdout=100)  # in-sample, no evidence rule
    logger.create_user(rt, "turn")
    posts = [logger.log_post(rt, "turn", t) for t in SARCASTIC_TRAIN]
    for p in posts:
        logger.log_feedback(rt, "turn", p.post_id, "negative", None, f"n-{p.post_id}")
    assert run_night(rt).counts() == {"promoted": 1}
    assert sum(logger.log_post(rt, "turn", t).prediction.label == "negative" for t in SARCASTIC_TRAIN) >= 12

    # The user changes their mind: the same posts are positive after all (the base's reading);
    # nearly all of them are held back, so tonight's candidate learns next to nothing.
    for p in posts:
        logger.log_feedback(rt, "turn", p.post_id, "positive", None, f"p-{p.post_id}")
    # (standing_ratio 0: the answers v1 served above, let stand, are not evidence here)
    rt.update_config = UpdateConfig(epochs=1, holdout_fraction=0.95, min_examples_for_holdout=1, standing_ratio=0.0)
    result = run_night(rt).results[0]
    assert result.status == RunStatus.rejected and result.metrics["back_to_base"] is True, result.metrics
    with Session(rt.engine) as s:
        assert registry.active(s, "turn") is None
        v1 = registry.get(s, "turn", 1)
        assert v1.status == AdapterStatus.retired and v1.reason.startswith("back to the base model:")
    assert logger.log_post(rt, "turn", SARCASTIC_TRAIN[0]).prediction.adapter_version is None


def test_the_label_prior_alone_is_judged_when_the_trained_candidate_fails(night_rt, monkeypatch):
    """A trained candidate the gate turns down no longer takes tonight's prior with it: the start
    adapter (here the base) with the prior alone is judged by the same gate on the held-back posts
    (`fallback_by_folds`: the base with tonight's offsets, judged by folds over all the labels),
    and promoted on evidence; `fallback_to_prior=False` turns the fallback off."""
    from nightowl.continual import update

    real_train = update.train_candidate

    def broken_training(kit, config, tonight, split, replay, train=True, **kw):
        # A real candidate whose training went wrong: its head answers "positive" to everything.
        cand = real_train(kit, config, tonight, split, replay, train=train, **kw)
        if train:
            head = next(m for n, m in cand.peft_model.named_modules() if n.endswith("head.modules_to_save.default"))
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
        return cand

    monkeypatch.setattr(update, "train_candidate", broken_training)
    rt = night_rt
    strong_prior = dict(epochs=1, prior_strength=0.1, min_examples_for_holdout=1, holdout_fraction=0.5)
    for user, fallback, folds in (("fb", True, 0), ("folds", True, 5), ("nofb", False, 5)):
        rt.update_config = UpdateConfig(fallback_to_prior=fallback, fallback_by_folds=folds > 0, gate_folds=folds, **strong_prior)
        logger.create_user(rt, user)
        _teach(rt, user, SARCASTIC_TRAIN, "negative")
        result = run_night(rt, only_users=[user]).results[0]
        with Session(rt.engine) as s:
            active = registry.active(s, user)
        if fallback:
            kind = "offsets_over_base" if folds else "prior_only"
            assert result.status == RunStatus.promoted and result.metrics["candidate_kind"] == kind
            assert "not enough evidence" in result.metrics["trained_candidate_rejected"]
            held = result.metrics["n_holdout"]
            assert result.metrics["gate_size"] == (len(SARCASTIC_TRAIN) if folds else held) and held > 0
            assert result.metrics["gate_evidence"]["passed"] and active.version == result.adapter_version
            assert "logit offsets" in active.reason
            bias, adjustment = _head_bias(rt, user)  # served: the base's head plus the prior, nothing trained
            base_bias = rt.predictor.pristine.head.bias.detach()
            assert torch.allclose(bias, base_bias + torch.tensor(adjustment), atol=1e-4)
        else:
            assert result.status == RunStatus.rejected and active is None
            assert result.metrics["candidate_kind"] == "trained"


def test_offsets_are_judged_by_folds_over_every_label(tmp_path, predictor):
    """`gate_folds`: each fold is answered by offsets fitted without it, every label is judged,
    and an answer let stand is judged on only where it was the base's own answer."""
    from nightowl.continual.gate import fold_of, judge_by_folds
    from nightowl.memory.examples import Example

    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    kit, folds = rt.personal, 4
    config = UpdateConfig(train_adapter=False, gate_folds=folds)
    labelled = [Example(i + 1, t, None, "negative", post_id=i + 1) for i, t in enumerate(SARCASTIC_TRAIN)]
    texts = SARCASTIC_TEST + ["What a lovely sunny morning", "The service was slow and rude"]
    base_says = [kit.labels[i] for i in kit.base_logits([Example(0, t, None, "neutral") for t in texts]).argmax(-1)]
    others = [next(lb for lb in kit.labels if lb != said) for said in base_says]
    # half the answers let stand are the base's, half another model's
    standing = [Example(0, t, None, said if k % 2 else other, post_id=100 + k)
                for k, (t, said, other) in enumerate(zip(texts, base_says, others))]
    neg = kit.labels.index("negative")
    always_negative = [0.0] * len(kit.labels)
    always_negative[neg] = 100.0
    seen_by_fit: list[set[int]] = []

    def fit(seen, logits):
        assert len(seen) == len(logits)
        seen_by_fit.append({e.post_id for e in seen})
        return always_negative

    verdict = judge_by_folds(kit, config, "u", labelled, standing, fit, start=None)
    everyone = {e.post_id for e in labelled + standing}
    fold = {e.post_id: fold_of("u", e, folds) for e in labelled + standing}
    judged = [everyone - s for s in seen_by_fit]
    assert all(len({fold[p] for p in j}) == 1 for j in judged)  # a fit never sees the fold it answers
    assert sorted(p for j in judged for p in j) == sorted(everyone)  # each post answered exactly once
    vouched = [e for e, said in zip(standing, base_says) if e.label == said]
    assert verdict.metrics["gate_size"] == len(labelled) + len(vouched)
    base_on_labels = [kit.labels[i] for i in kit.base_logits(labelled).argmax(-1)]
    wins = sum(said != "negative" for said in base_on_labels)  # the offsets answer "negative" to every post
    losses = sum(e.label != "negative" for e in vouched)
    assert (verdict.metrics["gate_evidence"]["wins"], verdict.metrics["gate_evidence"]["losses"]) == (wins, losses)
    assert verdict.promoted == (wins > losses and wins - losses >= math.sqrt(wins + losses)
                                and verdict.metrics["gate_candidate_macro_f1"] >= verdict.metrics["gate_base_macro_f1"])

    # a night: nothing held back, every label judged
    rt.update_config = UpdateConfig(train_adapter=False)
    logger.create_user(rt, "cv")
    _teach(rt, "cv", SARCASTIC_TRAIN[:12], "negative")
    m = run_night(rt).results[0].metrics
    assert m["n_holdout"] == 0 and m["gate_folds"] == 5 and m["gate_size"] == 12, m
    rt.close()


def test_a_lora_trained_from_offsets_over_the_base_learns_all_the_feedback(night_rt, monkeypatch):
    """Offsets over the base put nothing into the weights: the next night's LoRA trains on all
    the user's feedback (held-back posts excepted), as a user on the base's would, not only on
    what came after the offsets."""
    from nightowl.continual import update

    real_train = update.train_candidate

    def broken_training(kit, config, tonight, split, replay, train=True, **kw):
        cand = real_train(kit, config, tonight, split, replay, train=train, **kw)
        if train:  # night 1's training goes wrong, so the offsets over the base are promoted
            head = next(m for n, m in cand.peft_model.named_modules() if n.endswith("head.modules_to_save.default"))
            with torch.no_grad():
                head.weight.zero_()
                head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
        return cand

    rt = night_rt
    rt.update_config = UpdateConfig(epochs=1, prior_strength=0.1, min_examples_for_holdout=1, holdout_fraction=0.5,
                                    fallback_by_folds=True)
    logger.create_user(rt, "ob")
    _teach(rt, "ob", SARCASTIC_TRAIN, "negative")
    with monkeypatch.context() as m:
        m.setattr(update, "train_candidate", broken_training)
        first = run_night(rt).results[0]
    assert first.metrics["candidate_kind"] == "offsets_over_base" and first.status == RunStatus.promoted
    _teach(rt, "ob", SARCASTIC_TEST, "negative")
    second = run_night(rt).results[0]
    everything = len(SARCASTIC_TRAIN) + len(SARCASTIC_TEST)
    assert second.metrics["n_new"] == len(SARCASTIC_TEST)  # what came after the offsets ...
    assert second.metrics["n_train_new"] + second.metrics["n_holdout"] == everything  # ... but all of it is learnt
    assert second.metrics["replay"]["neighbours"] + second.metrics["replay"]["random"] == 0  # nothing older to replay


def test_doubted_answers_let_stand_count_by_the_estimated_share_of_wrong_ones():
    """doubt_silence: the base errs on 25% of its selection data; of 8 held-back posts it got 2
    wrong, 1 of which a label shows (a correction), so 1 of the 6 answers let stand is taken to be
    wrong: each counts 5/6 for the answer served, 1/6 for the other label."""
    from nightowl.adapters.train import scores
    from nightowl.continual.gate import doubted, sign_test, silence_doubt
    from nightowl.memory.examples import Example

    def ex(i: int, label: str, standing: bool) -> Example:
        return Example(id=0 if standing else i, text=f"post {i}", aspect=None, label=label, post_id=i)

    examples = [ex(1, "neg", False), ex(2, "pos", False)] + [ex(i, "neg", True) for i in range(3, 9)]
    gold = [0, 1] + [0] * 6
    base = [1, 1] + [0] * 6  # wrong on the first label only
    on = UpdateConfig()  # the default
    doubt = silence_doubt(on, 0.25, examples, gold, base)
    assert doubt == pytest.approx(1 / 6)
    assert silence_doubt(UpdateConfig(doubt_silence=False), 0.25, examples, gold, base) == 0.0  # off: silence is agreement
    assert silence_doubt(on, None, examples, gold, base) == 0.0  # no recorded error: nothing to go on
    assert silence_doubt(on, 0.9, examples, gold, base) == 0.5  # never counts against its own answer
    assert silence_doubt(on, 0.0, examples, gold, base) == 0.0  # fewer wrong than the labels show: none

    golds, weights, at = doubted(examples, gold, doubt, 2)
    assert len(golds) == 2 + 6 * 2 and sum(weights) == pytest.approx(len(examples))  # each post weighs one
    assert [w for w, i in zip(weights, at) if i == 3] == pytest.approx([5 / 6, 1 / 6])
    # a candidate that flips every answer let stand: right on 1 of the 6 by the estimate
    cand = [0, 1] + [1] * 6
    flipped = sign_test(golds, [cand[i] for i in at], [base[i] for i in at], z=0.0, weights=weights)
    assert flipped["wins"] == pytest.approx(1 + 1) and flipped["losses"] == pytest.approx(5)
    s = scores(golds, [cand[i] for i in at], 2, weights)
    assert s["accuracy"] == pytest.approx((2 + 1) / 8)
    # unweighted, scores are what they were
    assert scores([0, 1, 1], [0, 1, 0], 2) == scores([0, 1, 1], [0, 1, 0], 2, [1, 1, 1]) | {"confusion": [[1, 0], [1, 1]]}


def test_the_base_error_is_read_from_the_epoch_training_kept(night_rt):
    training = night_rt.personal.predictor.config.training
    kept = training["epochs"][training["selected_epoch"] - 1]
    assert night_rt.personal.base_error == pytest.approx(1 - kept["select_accuracy"] / 100)
    assert 0 < night_rt.personal.base_error < 0.5


def test_a_shrunk_adapter_lies_between_the_base_and_the_trained_one(night_rt, tmp_path):
    """ShrinkPath: scale 0 answers as the base, 1 as trained, and a scale in between is saved in
    the PEFT layout that plain peft loads to the same logits."""
    from nightowl.adapters.personal import user_head
    from nightowl.memory.examples import Example

    kit = night_rt.personal
    examples = [Example(i + 1, t, None, "negative") for i, t in enumerate(SARCASTIC_TEST + SARCASTIC_TRAIN[:4])]
    model = kit.trainable(None).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a change to the base, as training would make one
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
        user_head(model).weight.add_(0.5 * torch.randn_like(user_head(model).weight))
        user_head(model).bias.add_(torch.tensor([1.0, -1.0, 0.5]))
        base = kit.logits(kit.trainable(None).eval(), examples)
        trained = kit.logits(model, examples)
        path = kit.shrink_path(model)
        path.set(0.0)
        assert torch.allclose(kit.logits(model, examples), base, atol=1e-5)
        path.set(0.5)
        half = kit.logits(model, examples)
        assert (half - base).abs().max() > 1e-2 and (half - trained).abs().max() > 1e-2
        model.save_pretrained(tmp_path / "half")
        path.set(1.0)
        assert torch.allclose(kit.logits(model, examples), trained, atol=1e-5)  # back and forth along the path
        plain = PeftModel.from_pretrained(copy.deepcopy(kit.predictor.pristine), tmp_path / "half").eval()
        assert torch.allclose(kit.logits(plain, examples), half, atol=1e-5)
    assert (tmp_path / "half" / "adapter_model.safetensors").is_file()


def test_a_night_keeps_the_smallest_of_the_best_adapter_scales(night_rt):
    """adapter_scales: every scale is scored on the held-back posts, the smallest of the best is
    served, and the figures are recorded with the run."""
    rt = night_rt
    rt.update_config = UpdateConfig(epochs=8, adapter_scales=[1.0, 0.0, 0.5, 0.5])
    assert rt.update_config.adapter_scales == [0.0, 0.5, 1.0]
    logger.create_user(rt, "sarcastic")
    _teach(rt, "sarcastic", SARCASTIC_TRAIN + SARCASTIC_TEST, "negative")
    result = run_night(rt).results[0]
    scores = result.metrics["adapter_scale_scores"]
    assert set(scores) == {"0.0", "0.5", "1.0"} and result.metrics["n_holdout"] > 0
    best = max(scores.values())
    assert result.metrics["adapter_scale"] == min(float(s) for s, v in scores.items() if v >= best - 1e-9)


def test_adapter_scales_outside_zero_to_one_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="adapter_scales must lie in"):
        UpdateConfig(adapter_scales=[0.5, 1.5])
