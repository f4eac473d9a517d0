"""Forward throughput of the bundled model vs transformers' Mixtral on the same weights, and vs the dense model.

A random Llama-shaped dense model is upcycled twice from the same seed (``--target upcycle`` and
``--target mixtral``: identical routers and experts), for top-2 and top-1 routing. Each model runs
no-grad fp32 forwards of ``batch x seq`` tokens on CPU; the models are timed in interleaved rounds and the
best round is reported (the median too), which keeps a shared machine's noise out of the ratios.
Mixtral is timed with every experts implementation transformers offers (eager, batched_mm, grouped_mm).

    python benchmarks/bench_bundled.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's upcycle


def _dense(folder: Path, args) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=max(512, args.seq))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401 - registers upcycle_moe with the Auto classes

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _time(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, use_cache=False)
        return time.perf_counter() - start


def run(args) -> dict:
    from upcycle.convert import convert

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="bench_bundled_"))
    dense = _dense(tmp / "dense", args)
    models = {"dense": _load(dense)}
    for k in (2, 1):
        for target in ("upcycle", "mixtral"):
            out = tmp / f"{target}-top{k}"
            convert(dense, out, target=target, num_experts=args.experts, top_k=k, router_std=0.5, quiet=True)
            if target == "upcycle":
                models[f"bundled top-{k}"] = _load(out)
            else:
                for impl in args.impls.split(","):
                    models[f"mixtral[{impl}] top-{k}"] = _load(out, experts_implementation=impl)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = models["bundled top-2"](ids).logits
        mixtral = models[next(n for n in models if n.startswith("mixtral") and n.endswith("top-2"))](ids).logits
    same_weights_diff = float((reference - mixtral).abs().max())
    for model in models.values():  # warm-up
        _time(model, ids)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_time(model, ids))
    tokens = ids.numel()
    rows = {name: {"best_s": min(t), "median_s": statistics.median(t), "tokens_per_s": tokens / min(t)}
            for name, t in times.items()}
    summary = {}
    for k in (2, 1):
        mixtral_best = max((n for n in rows if n.startswith("mixtral") and n.endswith(f"top-{k}")),
                           key=lambda n: rows[n]["tokens_per_s"])
        summary[f"top-{k}"] = {
            "best_mixtral": mixtral_best,
            "bundled_vs_best_mixtral": rows[f"bundled top-{k}"]["tokens_per_s"] / rows[mixtral_best]["tokens_per_s"],
            "dense_vs_bundled_time": rows[f"bundled top-{k}"]["best_s"] / rows["dense"]["best_s"],
        }
    return {"settings": vars(args), "threads": torch.get_num_threads(), "tokens_per_forward": tokens,
            "max_logit_diff_bundled_vs_mixtral": same_weights_diff, "rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="eager,batched_mm,grouped_mm",
                        help="Mixtral experts implementations to time (comma-separated)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = run(args)
    print(f"{result['tokens_per_forward']} tokens per forward, {result['threads']} threads; "
          f"max |logit diff| bundled vs mixtral (same weights): {result['max_logit_diff_bundled_vs_mixtral']:.2e}")
    print(f"{'model':28s} {'tokens/s (best)':>16s} {'best s':>8s} {'median s':>9s}")
    for name, row in result["rows"].items():
        print(f"{name:28s} {row['tokens_per_s']:16.0f} {row['best_s']:8.3f} {row['median_s']:9.3f}")
    for k, s in result["summary"].items():
        print(f"{k}: bundled / {s['best_mixtral']} throughput = {s['bundled_vs_best_mixtral']:.2f}x; "
              f"bundled time / dense time = {s['dense_vs_bundled_time']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
