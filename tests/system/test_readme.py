"""The README quotes its benchmark tables from the results files, never by hand."""

from __future__ import annotations

import pytest

from benchmarks import report


@pytest.mark.parametrize("name", sorted(report.TABLES))
def test_readme_tables_match_results(name):
    table = report.render(name)
    if table is None:
        pytest.skip(f"no results file for {name} yet")
    readme = (report.ROOT / "README.md").read_text()
    assert f"<!-- table:{name} -->\n{table}\n<!-- /table:{name} -->" in readme, (
        f"README's {name} table is stale: run `python -m benchmarks.report --readme`"
    )


def _layout_section() -> str:
    readme = (report.ROOT / "README.md").read_text()
    start = readme.index("## Layout and architecture")
    return readme[start:readme.index("\n## ", start + 1)]


def test_readme_layout_names_only_paths_that_exist():
    """The layout table and the architecture text name files and folders: each one must exist."""
    import re

    section = _layout_section()
    paths = set(re.findall(r"`((?:nightowl|continual|memory|adapters|scheduler|benchmarks|tests)/[\w./]*)`", section))
    assert paths, "the layout section names no paths"
    missing = sorted(p for p in paths if not (report.ROOT / p).exists())
    assert not missing, f"README's layout names paths that don't exist: {missing}"


def test_readme_layers_are_the_enforced_contract():
    """The layer picture in README is the import-linter contract that the test suite enforces."""
    import tomllib

    config = tomllib.loads((report.ROOT / "pyproject.toml").read_text())
    [layers] = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    drawn = [line.split("  ")[0].strip() for line in _layout_section().split("```\n")[1].splitlines() if line.strip()]
    assert drawn == layers
