"""Forward throughput of the bundled model vs transformers' Mixtral on the same weights, and vs the dense model.

A random Llama-shaped dense model is upcycled twice from the same seed (``--target upcycle`` and
``--target mixtral``: identical routers and experts), for top-2 and top-1 routing. Each model runs
no-grad fp32 forwards of ``batch x seq`` tokens on CPU; the models are timed in interleaved rounds and the
best round is reported (the median too), which keeps a shared machine's noise out of the ratios.
Both are timed with every experts implementation transformers offers (eager, batched_mm, grouped_mm; the
bundled model's ``eager`` is its own grouped loop) and with the implementation ``from_pretrained`` picks
by default. ``batched_mm`` gathers one weight matrix per (token, expert) slot; where that would allocate
more than ``--max-impl-gb`` it is skipped and the output says so.

The ``floor top-k`` rows bound what any dispatch code can reach: the bundled model with each MoE block
replaced by its expert matrix products alone (each expert runs once on a contiguous slice of as many
tokens as the real routing sends it; no router, no sort, no gather, no weighting).

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


def _batched_mm_bytes(args, top_k: int) -> int:
    """What transformers' batched_mm gathers per MoE layer: the gate_up and down matrices of every slot (fp32)."""
    slots = args.batch * args.seq * top_k
    return slots * 3 * args.intermediate * args.hidden * 4


def _implementations(args, top_k: int, skipped: dict) -> list[str]:
    impls = []
    for impl in args.impls.split(","):
        need = _batched_mm_bytes(args, top_k) if impl == "batched_mm" else 0
        if need > args.max_impl_gb * 2**30:
            skipped[f"{impl} top-{top_k}"] = (f"would gather {need / 2**30:.1f} GiB of expert weights per layer "
                                              f"(> --max-impl-gb {args.max_impl_gb:g})")
            continue
        impls.append(impl)
    return impls


def _floor_model(model, ids: torch.Tensor):
    """``model`` with every MoE block reduced to its experts' matrix products on the routing's token counts."""
    from upcycle.modeling.modeling_upcycle_moe import UpcycleMoeBlock

    blocks = [m for m in model.modules() if isinstance(m, UpcycleMoeBlock)]
    counts: dict[int, list[int]] = {}
    for block in blocks:  # one real forward records how many slots each expert gets in each block
        block.route = (lambda x, original=block.route, block=block: _record(original(x), counts, block))
    with torch.no_grad():
        model(ids, use_cache=False)
    for block in blocks:
        del block.route
        block.forward = (lambda hidden, block=block: _experts_only(block, hidden, counts[id(block)]))
    return model


def _record(routed, counts: dict, block):
    counts[id(block)] = torch.bincount(routed[2].reshape(-1), minlength=block.num_experts).tolist()
    return routed


def _experts_only(block, hidden: torch.Tensor, counts: list[int]) -> torch.Tensor:
    x = hidden.reshape(-1, hidden.shape[-1])
    rows = x.repeat(block.top_k, 1) if block.top_k > 1 else x
    out = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[start:start + count] = block.experts.expert_forward(expert, rows[start:start + count])
            start += count
    return (out[:x.shape[0]] if block.top_k > 1 else out).reshape(hidden.shape)


def run(args) -> dict:
    from upcycle.convert import convert

    torch.set_num_threads(args.threads or torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="bench_bundled_"))
    dense = _dense(tmp / "dense", args)
    models = {"dense": _load(dense)}
    defaults, skipped = {}, {}
    for k in (2, 1):
        for target, label in (("upcycle", "bundled"), ("mixtral", "mixtral")):
            out = tmp / f"{target}-top{k}"
            convert(dense, out, target=target, num_experts=args.experts, top_k=k, router_std=0.5, quiet=True)
            default = _load(out)
            defaults[label] = default.config._experts_implementation
            models[f"{label}[default] top-{k}"] = default
            for impl in _implementations(args, k, skipped):
                models[f"{label}[{impl}] top-{k}"] = _load(out, experts_implementation=impl)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for k in (2, 1):
        models[f"floor top-{k}"] = _floor_model(_load(tmp / f"upcycle-top{k}"), ids)
    with torch.no_grad():
        reference = models["bundled[default] top-2"](ids).logits
        same_weights_diff = max(float((models[name](ids).logits - reference).abs().max())
                                for name in models if name.endswith("top-2") and not name.startswith("floor"))
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
        def best(label):
            return max((n for n in rows if n.startswith(label) and n.endswith(f"top-{k}")),
                       key=lambda n: rows[n]["tokens_per_s"])

        default = f"bundled[default] top-{k}"
        summary[f"top-{k}"] = {
            "best_mixtral": best("mixtral"), "best_bundled": best("bundled"),
            "bundled_default_vs_best_mixtral": rows[default]["tokens_per_s"] / rows[best("mixtral")]["tokens_per_s"],
            "bundled_best_vs_best_mixtral": rows[best("bundled")]["tokens_per_s"] / rows[best("mixtral")]["tokens_per_s"],
            "bundled_default_vs_dense_time": rows[default]["best_s"] / rows["dense"]["best_s"],
            "floor_vs_dense_time": rows[f"floor top-{k}"]["best_s"] / rows["dense"]["best_s"],
            "bundled_default_vs_floor_time": rows[default]["best_s"] / rows[f"floor top-{k}"]["best_s"],
        }
    return {"settings": vars(args), "threads": torch.get_num_threads(), "tokens_per_forward": tokens,
            "default_implementation": defaults, "skipped": skipped,
            "max_logit_diff_top2_vs_bundled_default": same_weights_diff, "rows": rows, "summary": summary}


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
    parser.add_argument("--max-impl-gb", type=float, default=2.0,
                        help="skip an implementation that would allocate more than this per layer (GiB)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = run(args)
    print(f"{args.batch}x{args.seq} = {result['tokens_per_forward']} tokens per forward, {result['threads']} threads; "
          f"default experts implementation {result['default_implementation']}; max |logit diff| of every top-2 "
          f"model vs the bundled default (same weights): {result['max_logit_diff_top2_vs_bundled_default']:.2e}")
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"{'model':32s} {'tokens/s (best)':>16s} {'best s':>8s} {'median s':>9s}")
    for name, row in result["rows"].items():
        print(f"{name:32s} {row['tokens_per_s']:16.0f} {row['best_s']:8.3f} {row['median_s']:9.3f}")
    for k, s in result["summary"].items():
        print(f"{k}: bundled[default] / {s['best_mixtral']} throughput = {s['bundled_default_vs_best_mixtral']:.2f}x "
              f"({s['best_bundled']}: {s['bundled_best_vs_best_mixtral']:.2f}x); "
              f"bundled[default] time / dense time = {s['bundled_default_vs_dense_time']:.2f}x; "
              f"floor / dense time = {s['floor_vs_dense_time']:.2f}x, "
              f"bundled[default] / floor time = {s['bundled_default_vs_floor_time']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
