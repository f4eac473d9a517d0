"""The figures in docs/benchmarks.md, docs/testing.md and the README are rendered from
benchmarks/results/*.json by benchmarks/render_docs.py; the pages must match what it renders."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs  # noqa: E402


@pytest.mark.parametrize("page", sorted(render_docs.PAGES))
def test_page_matches_its_results(page):
    path = render_docs.PAGES[page]
    text = path.read_text()
    assert render_docs.BLOCK.search(text), f"{path} has no generated block"
    assert text == render_docs.render_page(text, render_docs.load_results()), \
        f"stale {path}: run python benchmarks/render_docs.py"


def test_every_block_has_its_results():
    """A block whose benchmark has no results file renders a placeholder; none may be left on a page."""
    for path in render_docs.PAGES.values():
        assert "_No results for" not in path.read_text(), path


def test_every_result_says_where_and_when(tmp_path):
    for path in sorted(render_docs.RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        assert {"benchmark", "commit", "machine", "date", "settings", "rows"} <= set(result), path
        assert path.name.startswith(result["benchmark"] + "-") and result["commit"] in path.name, path
        assert result["settings"].get("command") or result["settings"].get("impls"), path


def test_check_flag_detects_a_stale_page(tmp_path):
    page = tmp_path / "benchmarks.md"
    shutil.copy(render_docs.PAGES["benchmarks"], page)
    text = page.read_text()
    page.write_text(text.replace("| 1 | 12.86 GB |", "| 1 | 99.99 GB |", 1))
    assert render_docs.main(["--check"], pages={"b": page}) == 1
    assert render_docs.main([], pages={"b": page}) == 0
    assert page.read_text() == text
    assert render_docs.main(["--check"], pages={"b": page}) == 0


def test_newest_result_wins(tmp_path, monkeypatch):
    """A new results file of a benchmark changes the README's figure; the hand-written text around it stays."""
    results = render_docs.load_results()
    newer = json.loads(json.dumps(results["convert_synthetic"][-1]))
    newer.update(commit="abc1234", date="2999-01-01T00:00:00+00:00", file="convert_synthetic-abc1234.json")
    newer["rows"]["help_median_s"] = 9.87
    results["convert_synthetic"].append(newer)
    page = "intro\n" + render_docs.MARK.format(name="readme", end="begin") + "\nold\n" + \
        render_docs.MARK.format(name="readme", end="end") + "\noutro\n"
    rendered = render_docs.render_page(page, results)
    assert "starts in 9.87 s (commit abc1234, 2999-01-01)" in rendered
    assert rendered.startswith("intro\n") and rendered.endswith("\noutro\n") and "\nold\n" not in rendered
