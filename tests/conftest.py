"""Shared fixtures: real SQLite files, a real PostgreSQL database when one is configured, the real model."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from nightowl.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
POSTGRES_ENV = "NIGHTOWL_TEST_POSTGRES_URL"


def _postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV)


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    admin_url = _postgres_admin_url()
    if not admin_url:
        pytest.skip(f"PostgreSQL cases skipped: set {POSTGRES_ENV} (CI's .ci/run does) to run them")
    name = f"nightowl_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # a configured but unreachable server is a failure, not a skip
        admin.dispose()
        raise RuntimeError(f"{POSTGRES_ENV} is set but PostgreSQL is not usable: {exc}") from exc
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each store test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nightowl.db'}"
    return request.getfixturevalue("postgres_url")


def make_settings(home: Path, **overrides) -> Settings:
    values = dict(home=home, admin_token=ADMIN_TOKEN, rationale_provider="none")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def predictor(tmp_path_factory):
    """The real packaged base model, loaded once for the whole test run."""
    from nightowl.adapters.predictor import Predictor

    return Predictor(make_settings(tmp_path_factory.mktemp("predictor-home")))


@pytest.fixture
def runtime(tmp_path, db_url, predictor):
    from nightowl.runtime import Runtime

    rt = Runtime(make_settings(tmp_path / "home", database_url=db_url), predictor=predictor)
    yield rt
    rt.close()


@pytest.fixture
def sqlite_runtime(tmp_path, predictor):
    from nightowl.runtime import Runtime

    rt = Runtime(make_settings(tmp_path / "home"), predictor=predictor)
    yield rt
    rt.close()


@pytest.fixture
def client(sqlite_runtime):
    from fastapi.testclient import TestClient

    from nightowl.api import create_app

    with TestClient(create_app(sqlite_runtime, background=False)) as c:
        yield c


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
