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
