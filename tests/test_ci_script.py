"""CI runs the tests that skip elsewhere (real SmolLM2, fresh venv) because .ci/run itself exports CI=1
before the test command, whatever the CI runner exports."""

from pathlib import Path

import test_bundled_loading
import test_e2e_smollm2

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_ci_script_exports_ci_before_the_tests():
    lines = [line.strip() for line in SCRIPT.read_text().splitlines()]
    export = next(i for i, line in enumerate(lines) if line.startswith("export CI=1"))
    tests = next(i for i, line in enumerate(lines) if "python -m pytest" in line and not line.startswith("#"))
    assert export < tests


def test_the_ci_gated_tests_read_that_variable():
    for module in (test_bundled_loading, test_e2e_smollm2):
        assert 'os.environ.get("CI")' in Path(module.__file__).read_text(), module.__name__
