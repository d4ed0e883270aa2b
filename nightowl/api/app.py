"""The app factory: it assembles the lifespan, the error handlers, the body-size limit and the routers."""

import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from nightowl.api.body_limit import BodySizeLimit
from nightowl.api.fast_feedback import FeedbackFastPath
from nightowl.api.errors import EXCEPTION_HANDLERS, invalid_request
from nightowl.api.openapi import enforced_openapi
from nightowl.api.routes import adapters, feedback, health, posts, users
from nightowl.auth import load_or_create_admin_token
from nightowl.day.rationale_worker import RationaleWorker
from nightowl.runtime import Runtime
from nightowl.scheduler.nightly import build_scheduler, next_run, stopping

log = logging.getLogger(__name__)


def create_app(rt: Runtime, background: bool = True) -> FastAPI:
    """The app over a runtime. `background` starts the rationale worker (tests may drive it by hand)."""
    admin_token_hash = _admin_token_hash(rt)
    app = FastAPI(
        title="nightowl interaction logger",
        version="1",
        description="Posts and feedback in, per-user sentiment predictions out.",
        lifespan=_model_and_background_work if background else _model_preloaded,
    )
    app.state.runtime = rt
    app.state.admin_token_hash = admin_token_hash
    app.add_exception_handler(RequestValidationError, invalid_request)
    for kind, handler in EXCEPTION_HANDLERS:
        app.add_exception_handler(kind, handler)
    # Inside the body limit, which has read the caller by then: see api.fast_feedback.
    app.add_middleware(FeedbackFastPath)
    # The largest body a request may carry: an image at its limit, base64 (4/3 larger), plus fields.
    app.add_middleware(BodySizeLimit, limit=rt.settings.limits.max_image_bytes * 4 // 3 + 256 * 1024)
    for resource in (health, users, posts, feedback, adapters):
        app.include_router(resource.router)
    app.openapi = lambda: enforced_openapi(app, rt.settings)  # the schema names the configured limits/labels
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's factory for `nightowl serve --workers N`: each worker process builds its own
    runtime (model, adapter cache, group committer, rationale worker, scheduler) from the
    settings in its environment, which it inherits from the command."""
    from nightowl.settings import Settings

    return create_app(Runtime(Settings()))


def _admin_token_hash(rt: Runtime) -> str:
    admin_hash, generated = load_or_create_admin_token(rt.settings.admin_token, rt.settings.home)
    if generated:
        log.warning("generated an admin token into %s", rt.settings.home / "admin_token")
    return admin_hash


@asynccontextmanager
async def _model_preloaded(app: FastAPI):
    # Load the model before taking requests: the first post shouldn't wait seconds for it.
    rt = app.state.runtime
    await run_in_threadpool(lambda: rt.predictor)
    # What is loaded by now (torch, transformers, the model: millions of objects) lives as long
    # as the server: out of the collector's sight, a full collection no longer scans it, which
    # stalled every request in flight for a few hundred ms (the ingest benchmark's p99).
    gc.freeze()
    yield


@asynccontextmanager
async def _model_and_background_work(app: FastAPI):
    """The preloaded model, plus the rationale worker and the nightly scheduler while the app serves."""
    async with _model_preloaded(app):
        rt = app.state.runtime
        worker = RationaleWorker(rt)
        worker.start()
        app.state.rationale_worker = worker  # /healthz reports whether it is alive
        scheduler = build_scheduler(rt)
        scheduler.start()
        log.info("nightly update scheduled; next run %s", next_run(scheduler))
        try:
            yield
        finally:
            stopping.set()
            scheduler.shutdown(wait=False)
            worker.stop()
