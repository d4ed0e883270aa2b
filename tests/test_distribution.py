"""The distribution as a user installs it: one import name, every module inside it, imports that
run one way (pyproject's import-linter contracts, checked on the built wheel's layout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the `nightowl` namespace lives in the repository (pyproject's package-dir).
PARTS = {"nightowl": "nightowl", "nightowl/adapters": "adapters", "nightowl/continual": "continual",
         "nightowl/memory": "memory", "nightowl/scheduler": "scheduler"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel built from a copy of the sources (a stale build/ folder can't leak into it),
    and the folder it unpacks to, as site-packages would hold it."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in set(PARTS.values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True)
    [whl] = out.glob("*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    return whl, site


def test_the_wheel_installs_exactly_one_import_name(wheel):
    whl, site = wheel
    with zipfile.ZipFile(whl) as z:
        tops = {name.split("/")[0] for name in z.namelist() if ".dist-info/" not in name}
    assert tops == {"nightowl"}
    [info] = site.glob("*.dist-info")
    top_level = info / "top_level.txt"
    if top_level.exists():
        assert top_level.read_text().split() == ["nightowl"]


def test_the_wheel_holds_every_module_and_the_shipped_model(wheel):
    _, site = wheel
    missing = [
        f"{folder}/{py.relative_to(ROOT / folder)}"
        for installed, folder in PARTS.items()
        for py in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in py.parts and not (site / installed / py.relative_to(ROOT / folder)).is_file()
    ]
    assert not missing, f"not in the wheel (add the package to pyproject's packages): {missing}"
    assert (site / "nightowl/adapters/base_model/fusion.safetensors").is_file()
    assert not (site / "benchmarks").exists()


def test_imports_run_one_way(wheel):
    """pyproject's import-linter contracts (layers, no circles) on the installed layout."""
    _, site = wheel
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
                       cwd=site, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
