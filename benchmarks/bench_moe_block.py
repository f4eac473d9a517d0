"""One MoE block against the dense MLP it came from: where top-1 time goes, without attention around it.

A Llama MLP (hidden 512, FFN 1536) and bundled-model blocks with 8 random experts of the same width, top-1
and top-2, each experts implementation; no-grad fp32 forwards of T tokens on 1 thread, interleaved rounds,
best round in ms.

    python benchmarks/bench_moe_block.py --tokens 256 --repeats 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's upcycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--impls", default="eager,grouped_mm")
    args = parser.parse_args()

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from upcycle.modeling.configuration_upcycle_moe import UpcycleMoeConfig
    from upcycle.modeling.modeling_upcycle_moe import UpcycleMoeBlock

    torch.set_num_threads(1)
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
                       num_attention_heads=8)
    x = torch.randn(args.tokens, args.hidden)
    dense = LlamaMLP(text).eval()
    runs = {"dense": lambda: dense(x)}
    for k in (1, 2):
        for impl in args.impls.split(","):
            config = UpcycleMoeConfig(text_config=text, num_experts=args.experts, num_experts_per_tok=k,
                                      moe_intermediate_size=args.intermediate)
            config._experts_implementation_internal = impl
            block = UpcycleMoeBlock(config).eval()
            for p in block.parameters():
                p.data.normal_(0, 0.5)
            runs[f"top-{k} {impl}"] = (lambda b=block: b(x))
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name:20s} {min(t) * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
