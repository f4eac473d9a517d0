"""Measure the fp32 noise of exact conversions on the tiny test models, and what a real break does.

For every family of tests/factories.py: a tiny dense model, its exact 4-expert top-2 MoE (default
target), then max |Δlogit| (dense vs MoE, random ids) as converted ("noise") and after giving one
expert's down projection a 1e-3 relative error (each element times 1 +- 1e-3) ("one_expert_1e-3", each of the 4 experts of layer 0 in turn). Writes benchmarks/results/exactness_noise-COMMIT.json;
docs/testing.md is rendered from it (benchmarks/render_docs.py).

    python benchmarks/exactness_noise.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    args = parser.parse_args()

    import torch
    from factories import CONFIGS, make_dense, max_logit_diff, perturb_one_expert
    from results import write_result

    from upcycle.convert import convert

    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in sorted(CONFIGS):
            dense = make_dense(family, Path(tmp) / family / "dense")
            moe = Path(tmp) / family / "moe"
            convert(dense, moe, num_experts=4, top_k=2, quiet=True, verify=False)
            noise = max_logit_diff(dense, moe)
            broken = []
            for expert in range(4):
                copy = Path(tmp) / family / f"moe{expert}"
                shutil.copytree(moe, copy)
                perturb_one_expert(copy, expert)
                broken.append(max_logit_diff(dense, copy))
            routed = [b for b in broken if b != noise]  # an expert no token reaches leaves the logits as they were
            rows[family] = {"noise": noise, "one_expert_1e-3": broken, "smallest_routed_break": min(routed)}
            print(f"{family:18s} noise {noise:.2e}   one expert 1e-3 {min(routed):.2e} .. {max(routed):.2e}",
                  flush=True)
    print(write_result("exactness_noise", {"experts": 4, "top_k": 2, "dtype": "float32", "threads": 1,
                                           "command": "python benchmarks/exactness_noise.py"}, rows, args.out))


if __name__ == "__main__":
    main()
