"""docs/architectures.md is generated from the registry; it must match what the code supports."""

import test_exact_native
import test_families_native

from upcycle import docs_gen
from upcycle.families import all_families


def test_page_is_current():
    assert docs_gen.PAGE.read_text() == docs_gen.render(), "stale page: run python -m upcycle.docs_gen"


def test_check_flag_detects_a_stale_page(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_gen, "PAGE", tmp_path / "architectures.md")
    assert docs_gen.main(["--check"]) == 1
    assert docs_gen.main([]) == 0
    assert docs_gen.main(["--check"]) == 0


def test_every_family_with_a_native_target_has_an_exactness_test():
    """The page says every family is tested against its native target; keep that true."""
    tested = {case[0] for case in test_exact_native.CASES + test_families_native.CASES}
    native = {name for name, fam in all_families().items() if fam.native_target}
    assert native <= tested, f"families without an exactness test: {sorted(native - tested)}"
