"""Training and scoring the shared base model on a labelled dataset."""

from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nightowl.adapters.checkpoint import (
    ENCODER_LINEAR_LAYERS,
    build_model,
    load_base_model,
    save_base,
    with_encoder_lora,
)
from nightowl.adapters.config import (
    FusionConfig,
    check_dict,
    check_int,
    check_number,
    check_str,
    check_str_list,
)
from nightowl.adapters.encoders import load_tokenizer, pick_device
from nightowl.adapters.fusion import RationaleFusedClassifier, distillation_loss
from nightowl.adapters.inputs import Batcher, ModelInput

log = logging.getLogger(__name__)


@dataclass
class TrainRecipe:
    """How the base model is trained (saved in its config's provenance as `training.recipe`)."""

    epochs: int = field(default=4, metadata={"help": "Passes over the training data (>= 1); with `select`, the best epoch is kept."})
    batch_size: int = field(default=16, metadata={"help": "Examples per optimiser step (>= 1)."})
    lr_encoder: float = field(default=5e-4, metadata={"help": "Learning rate (>= 0) of the encoder's LoRA."})
    lr_fusion: float = field(default=1e-3, metadata={"help": "Learning rate (>= 0) of the fusion layers and the head."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (>= 0)."})
    warmup_fraction: float = field(
        default=0.1, metadata={"help": "Share of the steps, in [0, 1], over which the learning rate warms up linearly."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the shuffling, the dropouts and the new layers' weights."})
    encoder_lora_r: int = field(default=16, metadata={"help": "LoRA rank (>= 1) on the encoder during base training."})
    encoder_lora_targets: list[str] | str = field(
        default=ENCODER_LINEAR_LAYERS,
        metadata={"help": "Encoder modules that get LoRA: a regex over module names or a list of names (peft `target_modules`)."},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Cross-entropy label smoothing, in [0, 1]."})
    distill_alpha: float = field(
        default=0.0,
        metadata={"help": "Weight, in [0, 1], of a teacher's soft labels in the loss (knowledge distillation, Hinton et "
                          "al. 2015; MulCoT-RD's teacher -> student step); 0: the labels alone. Above 0 the training "
                          "call needs the teacher's logits for every training example (`teacher_logits`)."},
    )
    distill_temperature: float = field(
        default=2.0, metadata={"help": "Temperature (>= 0.1) softening teacher and student alike in the soft-label loss."}
    )
    extra: dict = field(default_factory=dict, metadata={"help": "Free-form notes kept with the recipe (not read by training)."})

    def __post_init__(self) -> None:
        own = type(self).__name__
        check_int(own, "epochs", self.epochs, 1)
        check_int(own, "batch_size", self.batch_size, 1)
        for name in ("lr_encoder", "lr_fusion", "weight_decay"):
            check_number(own, name, getattr(self, name), 0.0)
        check_number(own, "warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        check_int(own, "seed", self.seed, 0)
        check_int(own, "encoder_lora_r", self.encoder_lora_r, 1)
        if isinstance(self.encoder_lora_targets, str):
            check_str(own, "encoder_lora_targets", self.encoder_lora_targets)
        else:
            check_str_list(own, "encoder_lora_targets", self.encoder_lora_targets, min_len=1)
        check_number(own, "label_smoothing", self.label_smoothing, 0.0, 1.0)
        check_number(own, "distill_alpha", self.distill_alpha, 0.0, 1.0)
        check_number(own, "distill_temperature", self.distill_temperature, 0.1)
        check_dict(own, "extra", self.extra)


def scores(gold: list[int], pred: list[int], n_labels: int, weights: list[float] | None = None) -> dict:
    """Accuracy and macro-F1 as fractions in [0, 1], the confusion matrix (rows: gold) and n.

    The one scoring function of the project (base training, the benchmarks and the night's gate
    all use it). What prints or stores percent multiplies by 100 where it reports. `weights`
    (one per example; default 1) count an example as that much of one: the gate's doubted answers
    let stand are one example split over the labels it may have (continual.gate.doubted).
    """
    gold_a, pred_a = np.array(gold), np.array(pred)
    w = np.ones(len(gold_a)) if weights is None else np.asarray(weights, dtype=float)
    f1s = []
    # Macro over the classes present in gold or prediction (sklearn's convention): a user whose
    # test labels are all one class is not charged a 0 for the class nobody used.
    present = (w > 0) if weights is not None else np.ones(len(gold_a), dtype=bool)
    for c in sorted(set(gold_a[present].tolist()) | set(pred_a[present].tolist())):
        tp = float(w[(gold_a == c) & (pred_a == c)].sum())
        fp = float(w[(gold_a != c) & (pred_a == c)].sum())
        fn = float(w[(gold_a == c) & (pred_a != c)].sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    count = int if weights is None else float
    confusion = [[count(w[(gold_a == g) & (pred_a == p)].sum()) for p in range(n_labels)] for g in range(n_labels)]
    return {"accuracy": float(w[gold_a == pred_a].sum() / w.sum()), "macro_f1": float(np.mean(f1s)),
            "confusion": confusion, "n": len(gold)}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, batcher: Batcher, items: list[ModelInput], batch_size: int = 64) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(items), batch_size):
        out.append(model(**batcher(items[i : i + batch_size])).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(batcher.config.labels))


def evaluate_items(model, batcher: Batcher, items: list[ModelInput], gold: list[int]) -> dict:
    """`scores` (fractions) of a model on labelled inputs."""
    logits = predict_logits(model, batcher, items)
    return scores(gold, logits.argmax(-1).tolist(), len(batcher.config.labels))


def soft_label_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, times temperature^2 so its gradients keep the
    scale of the hard-label loss whatever the temperature (Hinton et al. 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def _checked_teacher(recipe: TrainRecipe, teacher: torch.Tensor | None, n: int, n_labels: int) -> torch.Tensor | None:
    if recipe.distill_alpha == 0:
        return None  # a recipe without distillation ignores any teacher given
    if teacher is None:
        raise ValueError("TrainRecipe.distill_alpha > 0 needs teacher_logits for every training example")
    if tuple(teacher.shape) != (n, n_labels):
        raise ValueError(f"teacher_logits must be [{n}, {n_labels}] (one row per training example), got {list(teacher.shape)}")
    return teacher.float().cpu()


@torch.inference_mode()
def teacher_logits_of(model_dirs: list[Path], items: list[ModelInput], device: torch.device | str | None = None) -> torch.Tensor:
    """A teacher's logits for `items`: one saved base model's, or the log of several models'
    average probabilities (a seed ensemble, or models on other encoders). Each model must have
    the same labels, in the same order."""
    device = torch.device(device) if device else pick_device()
    probs, labels = [], None
    for d in model_dirs:
        model = load_base_model(Path(d)).to(device)
        if labels is not None and model.config.labels != labels:
            raise ValueError(f"teacher {d} has labels {model.config.labels}, the first one {labels}")
        labels = model.config.labels
        batcher = Batcher(load_tokenizer(model.config.text_model), model.config, device)
        probs.append(predict_logits(model, batcher, items).softmax(-1))
    if not probs:
        raise ValueError("teacher_logits_of needs at least one model folder")
    return torch.stack(probs).mean(0).clamp_min(1e-8).log()


def train_base_model(
    train: list[tuple[ModelInput, int]],
    select: list[tuple[ModelInput, int]] | None,
    config: FusionConfig,
    out_dir: Path | None,
    recipe: TrainRecipe | None = None,
    device: torch.device | str | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[RationaleFusedClassifier, dict]:
    """Train over the pretrained encoder; keep the epoch that scores best (macro-F1) on `select`.

    `teacher_logits` ([len(train), labels], row i for train[i]): a teacher's outputs, learned
    from with weight `recipe.distill_alpha` (`teacher_logits_of` makes them from saved models).
    Returns (model, report). The report has per-epoch seconds and selection scores; the model
    is saved to `out_dir` (if given) with the recipe in its config's provenance.
    """
    recipe = recipe or TrainRecipe()
    teacher_logits = _checked_teacher(recipe, teacher_logits, len(train), len(config.labels))
    device = torch.device(device) if device else pick_device()
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)

    model = with_encoder_lora(build_model(config), r=recipe.encoder_lora_r, targets=recipe.encoder_lora_targets).to(device)
    batcher = Batcher(load_tokenizer(config.text_model), config, device)
    enc_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    fusion_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": recipe.lr_encoder}, {"params": fusion_params, "lr": recipe.lr_fusion}],
        weight_decay=recipe.weight_decay,
    )
    steps = recipe.epochs * ((len(train) + recipe.batch_size - 1) // recipe.batch_size)
    warm = max(1, int(recipe.warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm)))

    report = {"epochs": [], "recipe": recipe.__dict__, "n_train": len(train), "n_select": len(select or [])}
    best, best_state = -1.0, None
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        t0, total = time.perf_counter(), 0.0
        batches = range(0, len(order), recipe.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch", leave=False, mininterval=2):
            chunk = [train[i] for i in order[start : start + recipe.batch_size]]
            batch = batcher([c[0] for c in chunk], train=True, generator=gen)
            labels = torch.tensor([c[1] for c in chunk], device=device)
            logits, aux = model(**batch, return_aux=True)
            loss = F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
            if teacher_logits is not None:
                taught = soft_label_loss(logits, teacher_logits[order[start : start + recipe.batch_size]].to(device),
                                         recipe.distill_temperature)
                loss = (1 - recipe.distill_alpha) * loss + recipe.distill_alpha * taught
            if "has_rationale" in batch:
                loss = loss + config.distill_weight * distillation_loss(aux, batch["has_rationale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc_params + fusion_params, 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(chunk)
        seconds = time.perf_counter() - t0
        entry = {"epoch": epoch + 1, "seconds": round(seconds, 1), "train_loss": total / len(train)}
        if select:
            sel = evaluate_items(model, batcher, [s[0] for s in select], [s[1] for s in select])
            # Percent: the report is printed and stored (the config's provenance, benchmark files).
            entry.update(select_accuracy=100 * sel["accuracy"], select_macro_f1=100 * sel["macro_f1"])
            if entry["select_macro_f1"] > best:
                best = entry["select_macro_f1"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info("epoch %s", entry)
        # stderr, beside the progress bars: stdout is the command's JSON report (nightowl train-base).
        tqdm.write(f"epoch {entry}", file=sys.stderr)
        report["epochs"].append(entry)
    if best_state is not None:
        model.load_state_dict(best_state)
        report["selected_epoch"] = 1 + max(range(len(report["epochs"])), key=lambda i: report["epochs"][i].get("select_macro_f1", -1))
    model.eval()
    # How often each label occurs in the training data: per-user adapters correct for a user
    # whose labels come at other rates (adapters.personal.PersonalKit.prior_adjustment).
    counts = np.bincount([t[1] for t in train], minlength=len(config.labels))
    config.training = {**config.training, "label_prior": [round(float(c) / len(train), 6) for c in counts]}
    if out_dir is not None:
        config.training = {**config.training, "recipe": recipe.__dict__, "epochs": report["epochs"],
                           "selected_epoch": report.get("selected_epoch")}
        save_base(model, Path(out_dir))
    return model, report
