#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules where a silent bug means a false "exact" or lost data.
# Not part of CI: each target runs minutes to an hour on a small machine. See docs/testing.md.
#
#   pip install -e ".[test,dev]"
#   scripts/mutation.sh TARGET            # TARGET: atomic, plan, experts, routers, targets, train, verify
#   scripts/mutation.sh custom 'upcycle/x.py' tests/test_x.py [more test files or pytest args]
#
# It works on a copy of the checkout (under $MUTATION_DIR, default /tmp/upcycle-mutation-TARGET), so the
# working tree is never touched; mutmut runs only the given test files, niced, and prints the
# surviving mutants and the score. MUTATION_TESTS_FROM=REV takes tests/ from commit REV (with this
# checkout's test helpers), for a before/after score. `cd $MUTATION_DIR && mutmut show NAME` shows one mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

target="${1:?usage: scripts/mutation.sh TARGET (atomic|plan|experts|routers|targets|train|verify|custom GLOB TESTS...)}"
shift
# the exactness tests that run in seconds: the split/router decisions and one family end to end
fast_exact=(tests/test_exactness.py::test_inexact_router_is_recorded_inexact
            tests/test_exactness.py::test_exact_split_is_recorded_exact
            "tests/test_exactness.py::test_one_expert_off_by_1e3_is_caught[llama]"
            "tests/test_exactness.py::test_one_expert_off_by_1e3_is_caught[qwen2]")
case "$target" in
  atomic)  mutate="upcycle/io/atomic.py";          tests=(tests/test_atomic.py tests/test_errors.py) ;;
  plan)    mutate="upcycle/plan.py";               tests=(tests/test_exactness.py tests/test_method_units.py) ;;
  experts) mutate="upcycle/experts/*";             tests=(tests/test_expert_units.py tests/test_method_units.py "${fast_exact[@]}") ;;
  routers) mutate="upcycle/routers/*";             tests=(tests/test_router_units.py tests/test_method_units.py "${fast_exact[@]}") ;;
  targets) mutate="upcycle/targets/*";             tests=(tests/test_exact_native.py tests/test_families_native.py) ;;
  train)   mutate="upcycle/train/run.py";          tests=(tests/test_train.py) ;;
  verify)  mutate="upcycle/verify.py";             tests=(tests/test_inspect_verify.py) ;;
  custom)  mutate="${1:?custom needs a glob}"; shift; tests=("$@") ;;
  *) echo "error: unknown target $target" >&2; exit 2 ;;
esac

work="${MUTATION_DIR:-${TMPDIR:-/tmp}/upcycle-mutation-$target}"
rm -rf "$work"
mkdir -p "$work"
cp -r upcycle tests pyproject.toml "$work/"
if [ -n "${MUTATION_TESTS_FROM:-}" ]; then   # score the tests of another commit ("before") against this code
  rm -rf "$work/tests"
  git archive "$MUTATION_TESTS_FROM" tests | tar -x -C "$work"
  cp tests/factories.py tests/checks.py "$work/tests/" 2>/dev/null || true
fi
present=()
for t in "${tests[@]}"; do
  if [[ "$t" == -* || -e "$work/${t%%::*}" ]]; then present+=("$t"); else echo "note: $t is not in these tests; skipped" >&2; fi
done
tests=("${present[@]}")
# mutmut reads [tool.mutmut] from pyproject.toml; this copy gets one for this target only.
{
  echo
  echo "[tool.mutmut]"
  echo "source_paths = [\"upcycle\"]"
  echo "only_mutate = [\"$mutate\"]"
  printf 'pytest_add_cli_args_test_selection = ['; printf '"%s", ' "${tests[@]}"; echo ']'
  echo 'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider"]'
} >> "$work/pyproject.toml"

cd "$work"
unset PYTHONPATH   # the mutated copy under mutants/ must be the one imported
export OMP_NUM_THREADS=1
nice -n 10 mutmut run || true
mutmut results --all true > results.txt || mutmut results > results.txt
python - "$work/results.txt" <<'PY'
import collections, re, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
    if m:
        counts[m.group(2)] += 1
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0)
print(dict(counts))
if total:
    print(f"mutation score: {killed}/{total} = {killed / total:.0%} killed")
PY
echo "survivors: cd $work && mutmut results; mutmut show NAME"
