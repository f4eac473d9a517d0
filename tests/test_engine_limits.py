"""Known engine limits (upcycle/engines.py) are checked against the plan and surface as warning lines."""

from __future__ import annotations

import json

import pytest
from checks import run_cli
from factories import make_dense

from upcycle.engines import ENGINE_LIMITS, engine_warnings


def _summary(**kw):
    return {"target": "mixtral", "num_experts": 8, "top_k": 2, **kw}


@pytest.mark.parametrize(("summary", "expected"), [
    (_summary(), []),
    (_summary(num_experts=6), ["llama.cpp: expert counts that are not a power of two (6 here)"]),
    (_summary(target="flex_olmo", num_experts=16), ["llama.cpp: convert_hf_to_gguf.py has no FlexOlmo"]),
    (_summary(target="upcycle", num_experts=3), ["llama.cpp: expert counts", "vLLM, SGLang, llama.cpp, MLX"]),
])
def test_rows_hit_by_the_summary(summary, expected):
    lines = engine_warnings(summary)
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected):
        assert line.startswith(start), line


def test_every_row_names_an_engine_and_a_known_condition():
    from upcycle.engines import TESTS

    for row in ENGINE_LIMITS:
        assert row["engine"] and row["limit"] and row["when"]
        for condition in row["when"].values():
            assert condition in TESTS if isinstance(condition, str) else isinstance(condition, list)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_dense("llama", tmp_path_factory.mktemp("engines") / "dense")


def test_dry_run_prints_the_warning_line(dense, tmp_path):
    hit = run_cli("convert", dense, tmp_path / "moe", "-e", "6", "-k", "2", "--dry-run")
    assert hit.exit_code == 0, hit.output
    warnings = [line for line in hit.stderr.splitlines() if line.startswith("warning: llama.cpp:")]
    assert len(warnings) == 1 and "not a power of two (6 here)" in warnings[0]
    clean = run_cli("convert", dense, tmp_path / "moe", "-e", "8", "-k", "2", "--dry-run", "--json")
    assert clean.exit_code == 0 and "warning:" not in clean.stderr
    assert json.loads(clean.stdout)["engine_limits"] == []
