"""`nightowl` command line: the same operations as the HTTP API, on the configured store, plus ops."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from nightowl.errors import InvalidInput, NightowlError, as_domain_error

# Each command imports what it uses when it runs: the model side pulls in torch (about 2 s), which
# `nightowl --help`, `nightowl db current` and a mistyped option should not wait for.

app = typer.Typer(
    name="nightowl",
    help="Personalized, continually learning sentiment analysis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
rationales_app = typer.Typer(help="The rationale queue.", no_args_is_help=True)
app.add_typer(users_app, name="users")
adapters_app = typer.Typer(help="Per-user adapter versions.", no_args_is_help=True)
app.add_typer(rationales_app, name="rationales")
app.add_typer(adapters_app, name="adapters")
db_app = typer.Typer(help="The database's schema (migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
bench_app = typer.Typer(help="Benchmarks (from a nightowl checkout: they are not installed).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _settings():
    from pydantic import ValidationError

    from nightowl.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:  # a bad NIGHTOWL_* variable or TOML value: say which, no traceback
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"configuration: {problems}") from None


def _runtime():
    from nightowl.runtime import Runtime

    return Runtime(_settings())


def _emit(obj: BaseModel | dict) -> None:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def cli_errors(fn):
    """Domain errors become a one-line message on stderr and the error's exit code, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NightowlError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (SQLAlchemyError, OSError) as exc:  # a busy/unreachable database (6), a full disk (7)
            mapped = as_domain_error(exc)
            if mapped is None:
                raise
            typer.echo(f"error: {mapped.message}", err=True)
            raise typer.Exit(mapped.exit_code) from None

    return wrapper


@app.command()
@cli_errors
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    workers: Annotated[
        int, typer.Option(min=1, help="Server processes: each has its own model, adapter cache and group committer.")
    ] = 1,
) -> None:
    """Run the HTTP API, the rationale worker and the nightly scheduler (in each of --workers processes)."""
    import uvicorn

    from nightowl.api import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if workers > 1:
        # On SQLite the workers' writes queue for the one write lock on an flock beside the
        # database (memory.db.WriteLock): each worker's group commits take turns.
        settings = _settings()
        typer.echo(f"nightowl: {workers} workers, home={settings.home}")
        # Each worker builds its runtime from the same settings (environment + TOML); the night's
        # database lease keeps their schedulers to one night at a time.
        uvicorn.run("nightowl.api.app:app_from_environment", factory=True, workers=workers, host=host, port=port,
                    log_level=log_level)
        return
    rt = _runtime()
    typer.echo(f"nightowl: home={rt.settings.home} database={rt.engine.url.render_as_string(hide_password=True)}")
    uvicorn.run(create_app(rt), host=host, port=port, log_level=log_level)


@app.command()
@cli_errors
def health() -> None:
    """Check the configured store (as GET /healthz does): database, model, rationale queue."""
    from nightowl.day import logger

    _emit(logger.health(_runtime()))


@users_app.command("create")
@cli_errors
def users_create(
    user_id: str,
    name: Annotated[Optional[str], typer.Option(help="Display name.")] = None,
) -> None:
    """Create a user and print its token (shown once)."""
    from nightowl.day import logger

    _emit(logger.create_user(_runtime(), user_id, name))


@users_app.command("delete")
@cli_errors
def users_delete(user_id: str) -> None:
    """Delete a user: their rows, replay vectors, adapters and images."""
    from nightowl.day import logger

    _emit(logger.delete_user(_runtime(), user_id))


@app.command()
@cli_errors
def post(
    user_id: str,
    text: str,
    aspect: Annotated[Optional[str], typer.Option(help="The aspect/target the sentiment is about.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="An image file posted with the text.")] = None,
    key: Annotated[Optional[str], typer.Option(help="Idempotency key: a retry with it is stored once.")] = None,
    context: Annotated[Optional[str], typer.Option(help="The post this one replies to.")] = None,
) -> None:
    """Log a post for a user and print the user's prediction."""
    from nightowl.day import logger

    data = None
    if image is not None:
        if not image.is_file():
            raise NightowlError(f"image file not found: {image}")
        data = image.read_bytes()
    _emit(logger.log_post(_runtime(), user_id, text, aspect, data, key, context))


@app.command()
@cli_errors
def feedback(
    user_id: str,
    post_id: int,
    label: str,
    reason: Annotated[Optional[str], typer.Option(help="Why this label (free text).")] = None,
    key: Annotated[Optional[str], typer.Option(help="Idempotency key: a retry with it is stored once.")] = None,
) -> None:
    """Record the label a user says is right for one of their posts."""
    from nightowl.day import logger

    _emit(logger.log_feedback(_runtime(), user_id, post_id, label, reason, key))


@app.command()
@cli_errors
def consume(
    url: Annotated[Optional[str], typer.Option(help="NATS URL; default: settings' broker.url.")] = None,
    until_idle: Annotated[bool, typer.Option(help="Exit once no message is waiting (else run until Ctrl-C/SIGTERM).")] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Posts stored at once (a fetched batch's feedback shares one commit).")
    ] = 8,  # consumer.DEFAULT_CONCURRENCY (not imported here: the CLI loads the broker code only when used)
) -> None:
    """Store posts and feedback from NATS JetStream (README: "Broker"); acked after commit, poison to the DLQ."""
    import asyncio
    import signal

    from nats.errors import NoServersError

    from nightowl.day.consumer import Consumer
    from nightowl.errors import Unavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = _runtime()
    cfg = rt.settings.broker if url is None else rt.settings.broker.model_copy(update={"url": url})
    consumer = Consumer(rt, cfg, concurrency=concurrency)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # finish the batch in hand, ack it, then exit
            loop.add_signal_handler(sig, consumer.stop)
        typer.echo(f"nightowl: consuming {cfg.stream}/{cfg.durable} from {cfg.url}", err=True)
        return await consumer.run(until_idle=until_idle)

    try:
        stats = asyncio.run(main())
    except NoServersError:
        raise Unavailable(f"broker {cfg.url} unreachable (start one: nats-server -js -a 127.0.0.1 -p 4222)") from None
    _emit(stats.as_dict())


@app.command()
@cli_errors
def history(
    user_id: str,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """List a user's recent posts with predictions and feedback, newest first."""
    from nightowl.day import logger

    _emit(logger.list_posts(_runtime(), user_id, limit, offset))


@rationales_app.command("run")
@cli_errors
def rationales_run(
    once: Annotated[bool, typer.Option(help="Work the jobs due now, then exit.")] = True,
) -> None:
    """Generate the rationales that are due (the server does this in the background)."""
    from nightowl.day.rationale_worker import RationaleWorker

    worker = RationaleWorker(_runtime())
    if worker.provider is None:
        raise NightowlError("rationale_provider is 'none': nothing to do")
    total = 0
    while True:
        done = worker.run_once()
        total += done
        if once or not done:
            break
    typer.echo(json.dumps({"generated": total}))


@app.command()
@cli_errors
def nightly(
    now: Annotated[bool, typer.Option("--now", help="Run the nightly update now.")] = False,
    user: Annotated[Optional[list[str]], typer.Option(help="Only these users (repeatable).")] = None,
) -> None:
    """Run the nightly per-user update now, with a progress bar (the server runs it on schedule)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from nightowl.continual.jobs import NightAlreadyRunning
    from nightowl.continual.night import run_night

    if not now:
        raise NightowlError("pass --now to run the nightly update now (the server runs it on its schedule)")
    logging.basicConfig(level=logging.WARNING)
    rt = _runtime()
    with Progress(
        TextColumn("[bold]night"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), transient=False,
    ) as progress:
        task = progress.add_task("planning", total=None)

        def on_result(result, done: int, total: int) -> None:
            progress.update(task, total=total, completed=done, description=f"{result.user_id}: {result.status.value}")

        try:
            summary = run_night(rt, only_users=user, on_result=on_result)
        except NightAlreadyRunning as exc:
            raise NightowlError(str(exc)) from None
        progress.update(task, total=max(1, len(summary.results)), completed=max(1, len(summary.results)), description="done")
    _emit(
        {
            "night_id": summary.night_id,
            "counts": summary.counts(),
            "users": [
                {"user_id": r.user_id, "status": r.status.value, "adapter_version": r.adapter_version,
                 "seconds": round(r.seconds, 1), "error": r.error}
                for r in summary.results
            ],
        }
    )


@adapters_app.command("list")
@cli_errors
def adapters_list(user_id: str) -> None:
    """A user's adapter versions and their status (active, candidate, rejected, retired)."""
    from nightowl.day import logger

    _emit(logger.list_adapters(_runtime(), user_id))


@adapters_app.command("export")
@cli_errors
def adapters_export(
    user_id: str,
    dest: Path,
    version: Annotated[Optional[int], typer.Option(help="Version to export; default: the active one.")] = None,
) -> None:
    """Copy an adapter (standard PEFT layout) to DEST; plain PeftModel.from_pretrained loads it."""
    from nightowl.day import logger

    _emit(logger.export_adapter(_runtime(), user_id, version, dest))


@adapters_app.command("rollback")
@cli_errors
def adapters_rollback(
    user_id: str,
    version: Annotated[str, typer.Argument(help="A version number, or 'base' for no adapter.")],
) -> None:
    """Make an earlier adapter version active again (or go back to the base model)."""
    from nightowl.day import logger

    if version != "base" and not version.isdigit():
        raise NightowlError("version must be a number or 'base'")
    _emit(logger.rollback_adapter(_runtime(), user_id, None if version == "base" else int(version)))


@app.command()
@cli_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="A saved base model folder.")],
    data: Annotated[Path, typer.Option(help="A TomBERT-format TSV: index, label, image_id, tweet, aspect.")],
    images: Annotated[Optional[Path], typer.Option(help="The TSV's image folder.")] = None,
) -> None:
    """Score a saved model on any TomBERT-format TSV (no rationales are given to it)."""
    from nightowl.adapters.data import DatasetError
    from nightowl.adapters.evaluate import evaluate_model

    for path, what in ((model, "model folder"), (data, "data file"), (images, "image folder")):
        if path is not None and not path.exists():
            raise NightowlError(f"{what} not found: {path}")
    try:
        _emit(evaluate_model(model, data, images))
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise NightowlError(str(exc)) from None


@app.command("train-base")
@cli_errors
def train_base(
    train: Annotated[Path, typer.Option(help="Training data, TomBERT-format TSV.")],
    out: Annotated[Path, typer.Option(help="Folder to write the base model to.")],
    select: Annotated[Optional[Path], typer.Option(help="Model-selection TSV (best epoch by macro-F1).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder for both TSVs.")] = None,
    rationales: Annotated[Optional[Path], typer.Option(help="Rationale JSONL joined on (image_id, aspect): training signal only.")] = None,
    labels: Annotated[str, typer.Option(help="Names of label ids 0, 1, ... (comma-separated).")] = "negative,neutral,positive",
    epochs: int = 4,
    seed: int = 0,
    teacher: Annotated[Optional[list[Path]], typer.Option(
        help="A saved base model to learn from as well as from the labels (repeatable: their average, e.g. a seed "
             "ensemble or a larger encoder's model; same labels).")] = None,
    distill_alpha: Annotated[float, typer.Option(help="With --teacher: the weight, in [0, 1], of its soft labels.")] = 0.5,
    distill_temperature: Annotated[float, typer.Option(help="With --teacher: the softmax temperature (>= 0.1).")] = 2.0,
) -> None:
    """Train the shared base model on a labelled dataset and save it with its config."""
    from nightowl.adapters.config import FusionConfig
    from nightowl.adapters.data import (
        DatasetError,
        attach_rationales,
        image_features,
        read_tombert_tsv,
    )
    from nightowl.adapters.encoders import ImageEncoder
    from nightowl.adapters.inputs import ModelInput
    from nightowl.adapters.train import TrainRecipe, teacher_logits_of, train_base_model

    names = [x.strip() for x in labels.split(",")]
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise NightowlError("--labels needs at least two distinct, non-empty names")
    for t in teacher or []:
        if not (t / "nightowl_config.json").is_file():
            raise InvalidInput(f"teacher is not a saved base model folder (no nightowl_config.json): {t}")
        taught_labels = FusionConfig.load(t).labels
        if taught_labels != names:
            raise InvalidInput(f"teacher {t} has labels {taught_labels}, --labels names {names}: they must be the same")
    try:
        recipe = TrainRecipe(epochs=epochs, seed=seed, distill_alpha=distill_alpha if teacher else 0.0,
                             distill_temperature=distill_temperature)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    try:
        train_rows = read_tombert_tsv(train, n_labels=len(names))
        select_rows = read_tombert_tsv(select, n_labels=len(names)) if select else None
    except DatasetError as exc:
        raise NightowlError(str(exc)) from None
    if rationales:
        attach_rationales(train_rows, rationales)
    feats = image_features(train_rows + (select_rows or []), images, ImageEncoder()) if images else {}

    def items(rows, with_rationale):
        return [(ModelInput(r.text, r.aspect, None, feats[r.image_id].float() if r.image_id in feats else None,
                            r.rationale if with_rationale else None), r.label) for r in rows]

    config = FusionConfig(labels=names)
    config.training = {"train": str(train), "select": str(select) if select else None, "images": bool(images),
                       "rationales": str(rationales) if rationales else None,
                       "teacher": [str(t) for t in teacher] if teacher else None}
    taught = None
    if teacher:
        try:  # the teachers judge each post as it is served: without its rationale
            taught = teacher_logits_of(teacher, [x for x, _ in items(train_rows, False)])
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    _, report = train_base_model(items(train_rows, True), items(select_rows, False) if select_rows else None,
                                 config, out, recipe, teacher_logits=taught)
    _emit({"out": str(out), **report})


@db_app.command("upgrade")
@cli_errors
def db_upgrade() -> None:
    """Bring the configured database to the current schema (every start of nightowl does this too)."""
    from nightowl.memory import migrations
    from nightowl.memory.db import make_engine

    engine = make_engine(_settings().db_url)
    try:
        before, after = migrations.upgrade(engine)
    finally:
        engine.dispose()
    _emit({"database": engine.url.render_as_string(hide_password=True), "from": before, "to": after})


@db_app.command("current")
@cli_errors
def db_current() -> None:
    """Print the database's schema revision and the newest one this nightowl knows (head)."""
    from nightowl.memory import migrations
    from nightowl.memory.db import make_engine

    engine = make_engine(_settings().db_url)
    try:
        current = migrations.current(engine)
    finally:
        engine.dispose()
    _emit({"database": engine.url.render_as_string(hide_password=True), "current": current,
           "head": migrations.head()})


BENCHMARKS = ("personalize", "power", "personal_parts", "twitter2015", "ingest", "ingest_broker", "inference",
              "nightly_cost", "faiss_memory", "request_memory", "report", "convert_multipico")


@bench_app.command(
    "run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def bench_run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}; its own options follow (--help shows them).")],
) -> None:
    """Run `python -m benchmarks.NAME ...` from the current folder (a nightowl checkout)."""
    _run_benchmark(name, ctx.args)


@bench_app.command(
    "personalize", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def bench_personalize(ctx: typer.Context) -> None:
    """The personalization benchmark (`python -m benchmarks.personalize`; --help lists its options)."""
    _run_benchmark("personalize", ctx.args)


@cli_errors
def _run_benchmark(name: str, args: list[str]) -> None:
    # The benchmarks live beside the sources, not in the installed package (the layers run one
    # way: the CLI never imports them), so this forwards to the checkout the command is run in.
    import subprocess

    if name not in BENCHMARKS:
        raise InvalidInput(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if not (Path.cwd() / "benchmarks" / f"{name}.py").is_file():
        raise InvalidInput(f"no benchmarks/{name}.py here: run `nightowl bench` from a nightowl checkout")
    raise typer.Exit(subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *args]))


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
