"""Plant known one-line bugs, one at a time, in a copy of the checkout and check that the named tests fail.

mutmut does not mutate decorated functions (``@property``, ``@contextlib.contextmanager``), which is
where two of the decisions that matter most live (``ConversionPlan.exact``, ``atomic_folder``); this
script covers them, and the bugs a review planted in issue 14. Not part of CI (minutes); see docs/testing.md.

    python scripts/planted_bugs.py            # every bug
    python scripts/planted_bugs.py -k exact   # those whose name contains "exact"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    #: why the bug cannot change a result (it survives by design); empty for a real bug
    equivalent: str = ""


EXACTNESS = "tests/test_exactness.py"
TARGETS = "tests/test_target_units.py"
BUGS = [
    Bug("verify: max without abs", "upcycle/verify.py", "(a - b).abs().max()", "(a - b).max()",
        ("tests/test_inspect_verify.py::test_verify_catches_a_uniform_logit_shift",)),
    Bug("plan.exact: router check dropped", "upcycle/plan.py",
        "return (method_exact and router_exact and", "return (method_exact and",
        (f"{EXACTNESS}::test_inexact_router_is_recorded_inexact",)),
    Bug("plan.exact: method check dropped", "upcycle/plan.py",
        "return (method_exact and router_exact and", "return (router_exact and",
        (f"{EXACTNESS}::test_every_inexact_recipe_is_recorded_inexact",),
        equivalent="every inexact method marks its layers inexact (drop: when it redraws any neuron), which the "
                   "layer check reads; without the term, drop with --drop-ratio 0 (a replicate) is recorded exact, "
                   "which is true"),
    Bug("plan.exact: noise ignored", "upcycle/plan.py",
        "get_method(self.recipe.method).exact and not self.recipe.noise_std", "get_method(self.recipe.method).exact",
        (f"{EXACTNESS}::test_every_inexact_recipe_is_recorded_inexact",),
        equivalent="add_noise marks every MoE layer inexact, which the layer check reads"),
    Bug("plan.exact: layer exactness ignored", "upcycle/plan.py",
        "                and all(l.exact for l in self.layers.values()))", "                )",
        (f"{EXACTNESS}::test_every_inexact_recipe_is_recorded_inexact",)),
    Bug("plan.exact: router check inverted", "upcycle/plan.py",
        "router_exact = not get_router_init(self.recipe.router_init).per_expert or",
        "router_exact = get_router_init(self.recipe.router_init).per_expert or",
        (f"{EXACTNESS}::test_inexact_router_is_recorded_inexact", f"{EXACTNESS}::test_exact_split_is_recorded_exact")),
    Bug("atomic: old output deleted before the final rename", "upcycle/io/atomic.py",
        "    os.rename(output, old)\n", "    shutil.rmtree(output)\n    old.mkdir()\n",
        ("tests/test_atomic.py::test_force_keeps_the_old_output_until_the_new_one_is_in_place",)),
    Bug("atomic: old output not put back when the final rename fails", "upcycle/io/atomic.py",
        "        os.rename(old, output)  # the old output goes back under its name\n", "",
        ("tests/test_atomic.py::test_force_keeps_the_old_output_until_the_new_one_is_in_place",)),
    Bug("atomic: --force replaces the old output at the start", "upcycle/io/atomic.py",
        "        check_output(output, force)  # again, now that no other run can claim it\n",
        "        check_output(output, force)\n        if force and output.is_dir():\n            shutil.rmtree(output)\n",
        ("tests/test_errors.py::test_disk_full_while_replacing_keeps_the_old_output",)),
    Bug("train: resume_from_checkpoint dropped", "upcycle/train/run.py",
        "trainer.train(resume_from_checkpoint=resume_from)", "trainer.train()",
        ("tests/test_train.py::test_resume_continues_from_the_last_checkpoint",)),
    Bug("qwen2_moe: top-k not renormalised", "upcycle/targets/qwen2_moe.py",
        '"norm_topk_prob": True', '"norm_topk_prob": False',
        (f"{EXACTNESS}::test_one_expert_off_by_1e3_is_caught[qwen2]",)),
    Bug("qwen3_moe: top-k not renormalised", "upcycle/targets/qwen3_moe.py",
        '"norm_topk_prob": True', '"norm_topk_prob": False',
        (f"{EXACTNESS}::test_one_expert_off_by_1e3_is_caught[qwen3]",)),
    Bug("bundled model: top-k not renormalised", "upcycle/targets/upcycle.py",
        "norm_topk_prob=True", "norm_topk_prob=False",
        (f"{EXACTNESS}::test_one_expert_off_by_1e3_is_caught[gpt2]",)),
    # the layouts are module-level data, which mutmut does not mutate (it mutates inside functions only)
    Bug("mixtral: gate and up names swapped", "upcycle/targets/mixtral.py",
        'proj_names={"gate": "w1", "up": "w3", "down": "w2"}', 'proj_names={"gate": "w3", "up": "w1", "down": "w2"}',
        (f"{TARGETS}::test_fine_grained_split_is_exact[llama-mixtral]",)),
    Bug("per-expert layout: gate and up names swapped", "upcycle/targets/base.py",
        'proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}',
        'proj_names={"gate": "up_proj", "up": "gate_proj", "down": "down_proj"}',
        (f"{TARGETS}::test_fine_grained_split_is_exact[qwen3-qwen3_moe]",)),
    Bug("granitemoe: up packed before gate", "upcycle/targets/granitemoe.py",
        '"model.layers.{i}.block_sparse_moe.input_linear.weight": ("gate", "up")',
        '"model.layers.{i}.block_sparse_moe.input_linear.weight": ("up", "gate")',
        (f"{TARGETS}::test_fine_grained_split_is_exact[granite-granitemoe]",)),
    Bug("granitemoeshared: shared MLP packs up before gate", "upcycle/targets/granitemoeshared.py",
        '"model.layers.{i}.shared_mlp.input_linear.weight": ("gate", "up")',
        '"model.layers.{i}.shared_mlp.input_linear.weight": ("up", "gate")',
        (f"{TARGETS}::test_replicate_top1_is_exact[granite-granitemoeshared]",)),
    Bug("hunyuan_v1_moe: router key of the other per-expert targets", "upcycle/targets/hunyuan_v1_moe.py",
        'router_key="model.layers.{i}.mlp.gate.wg.weight"', 'router_key="model.layers.{i}.mlp.gate.weight"',
        (f"{TARGETS}::test_fine_grained_split_is_exact[hunyuan_v1_dense-hunyuan_v1_moe]",)),
    Bug("shared MLP: not half of a full-width FFN", "upcycle/targets/_shared_mlp.py", "HALF = 0.5", "HALF = 0.25",
        (f"{TARGETS}::test_replicate_top1_is_exact[qwen3-dots1]",)),
    Bug("qwen2_moe: shared expert not doubled behind its sigmoid(0) gate", "upcycle/targets/qwen2_moe.py",
        "shared_expert_scale=2.0", "shared_expert_scale=1.0",
        (f"{TARGETS}::test_carved_out_shared_expert_is_exact[qwen2-qwen2_moe]",)),
    Bug("bundled model: the shared expert gets the dense down bias too", "upcycle/targets/upcycle.py",
        "                                   not experts.experts, None))", "                                   True, None))",
        (f"{TARGETS}::test_carved_out_shared_expert_is_exact[gpt2-upcycle]",)),
    Bug("bundled model: shared_expert_scale 2.0", "upcycle/targets/upcycle.py",
        "shared_expert_scale=1.0", "shared_expert_scale=2.0",
        (f"{TARGETS}::test_carved_out_shared_expert_is_exact[llama-upcycle]",),
        equivalent="the bundled layout writes the shared slice as planned and never reads the scale; only "
                   "whether it is None (the target takes --shared-experts) matters"),
]


def run(bug: Bug, work: Path) -> bool:
    """True when the tests fail with the bug planted (the bug is caught)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "upcycle", work / "upcycle")
    shutil.copytree(ROOT / "tests", work / "tests")
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    path = work / bug.file
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.name}: the text to replace is not in {bug.file} exactly once; update this script")
    path.write_text(text.replace(bug.old, bug.new))
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests],
                          cwd=work, env=env, capture_output=True, text=True)
    return done.returncode != 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the bugs whose name contains this")
    args = ap.parse_args()
    missed = []
    with tempfile.TemporaryDirectory(prefix="upcycle-planted-") as tmp:
        for bug in (b for b in BUGS if args.k in b.name):
            caught = run(bug, Path(tmp) / "copy")
            if bug.equivalent:
                print(f"{'caught' if caught else 'survives'}  {bug.name} (equivalent: {bug.equivalent})", flush=True)
                continue
            print(f"{'caught' if caught else 'MISSED'}  {bug.name}", flush=True)
            if not caught:
                missed.append(bug.name)
    print(f"{len(missed)} missed" + (": " + ", ".join(missed) if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
