#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules where a silent bug means a false "exact" or lost data.
# Not part of CI: each target runs minutes to an hour on a small machine. See docs/testing.md.
#
#   pip install -e ".[test,dev]"
#   scripts/mutation.sh TARGET            # TARGET: atomic, plan, experts, routers, targets, train, verify, verify-e2e
#   scripts/mutation.sh custom 'upcycle/x.py' tests/test_x.py [more test files or pytest args]
#
# It works on a copy of the checkout (under $MUTATION_DIR, default /tmp/upcycle-mutation-TARGET), so the
# working tree is never touched; mutmut runs only the given test files, niced, and prints the
# surviving mutants and the score. MUTATION_TESTS_FROM=REV takes tests/ from commit REV (with this
# checkout's test helpers), for a before/after score. `cd $MUTATION_DIR && mutmut show NAME` shows one mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

target="${1:?usage: scripts/mutation.sh TARGET (atomic|plan|experts|routers|targets|train|verify|verify-e2e|custom GLOB TESTS...)}"
shift
# the exactness tests that run in seconds: the split/router decisions and one family end to end
fast_exact=(tests/test_exactness.py::test_inexact_router_is_recorded_inexact
            tests/test_exactness.py::test_exact_split_is_recorded_exact
            "tests/test_exactness.py::test_one_expert_off_by_1e3_is_caught[llama]"
            "tests/test_exactness.py::test_one_expert_off_by_1e3_is_caught[qwen2]")
# three in-memory conversions through the plan into a target class, compared with the dense model
target_exact=("tests/test_target_units.py::test_fine_grained_split_is_exact[llama-mixtral]"
              "tests/test_target_units.py::test_fine_grained_split_is_exact[phi3-upcycle]"
              "tests/test_target_units.py::test_layer_subset_is_exact[qwen2-qwen2_moe]")
only=()   # mutant-name globs; empty: every mutant of the files
case "$target" in
  atomic)  mutate="upcycle/io/atomic.py";          tests=(tests/test_atomic.py tests/test_errors.py) ;;
  plan)    mutate="upcycle/plan.py";               tests=(tests/test_plan_units.py "${target_exact[@]}") ;;
  experts) mutate="upcycle/experts/*";             tests=(tests/test_expert_units.py tests/test_method_units.py "${fast_exact[@]}") ;;
  routers) mutate="upcycle/routers/*";             tests=(tests/test_router_units.py tests/test_method_units.py "${fast_exact[@]}") ;;
  targets) mutate="upcycle/targets/*";             tests=(tests/test_target_units.py) ;;
  train)   mutate="upcycle/train/run.py";          tests=(tests/test_train_units.py)
           # every function but train() and _prepare_model/_apply_lora, whose mutants would each train or load
           # a model; train()'s hand-over of the checkpoint is a planted bug (scripts/planted_bugs.py)
           only=("upcycle.train.run.x__resume_checkpoint__*" "upcycle.train.run.xǁTrainOptionsǁvalidate__*"
                 "upcycle.train.run.x__training_arguments__*" "upcycle.train.run.x__save_final__*"
                 "upcycle.train.run.x_eos_id__*" "upcycle.train.run.x__check_sharding_launcher__*"
                 "upcycle.train.run.x__has_accelerator__*" "upcycle.train.run.x__checkpointing_arg__*"
                 "upcycle.train.run.x__load_brief__*" "upcycle.train.run.x__dtype_of__*") ;;
  verify)  mutate="upcycle/verify.py";             tests=(tests/test_verify_units.py)
           # the functions that need no model run; verify-e2e has the three that run models
           only=()
           for f in report_text read_prompts _random_prompts _claims_exact _claims_forced_exact forced_expert_count \
                    copy_expert route_all_to_expert _stored_dtype _model_bytes memory_budget _layer_tolerance \
                    _split_groups split_selections; do only+=("upcycle.verify.x_${f}__*"); done
           only+=("upcycle.verify.xǁVerifyReportǁto_dict__*") ;;
  verify-e2e) mutate="upcycle/verify.py";          tests=(tests/test_verify_units.py tests/test_verify_streamed.py)
           only=("upcycle.verify.x_verify__*" "upcycle.verify.x__compare_layers__*" "upcycle.verify.x__generate__*") ;;
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
value=0   # the word after -k/-m is the option's value, not a test path
for t in "${tests[@]}"; do
  if [[ $value == 1 || "$t" == -* || -e "$work/${t%%::*}" ]]; then present+=("$t"); else echo "note: $t is not in these tests; skipped" >&2; fi
  if [[ "$t" == -k || "$t" == -m ]]; then value=1; else value=0; fi
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
# MUTATION_CHILDREN: parallel mutants (default 1: a shared 2-core machine); MUTATION_ONLY: mutant-name globs
# (e.g. 'upcycle.train.run.x__resume_checkpoint__*') replace the target's own list; the run then skips the rest
if [ -n "${MUTATION_ONLY:-}" ]; then read -r -a only <<< "$MUTATION_ONLY"; fi
nice -n 10 mutmut run --max-children "${MUTATION_CHILDREN:-1}" "${only[@]}" || true
mutmut results --all true > results.txt || mutmut results > results.txt
python - "$work/results.txt" <<'PY'
import collections, re, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
    if m:
        counts[m.group(2)] += 1
unrun = counts.pop("not checked", 0)   # outside the mutant-name filter
total = sum(counts.values())
killed = counts.get("killed", 0) + counts.get("timeout", 0)
print(dict(counts), f"(not run: {unrun})" if unrun else "")
if total:
    print(f"mutation score: {killed}/{total} = {killed / total:.0%} killed")
PY
echo "survivors: cd $work && mutmut results; mutmut show NAME"
