"""Cost per token of one expert's matrix products against the number of rows (tokens) it gets.

One gated expert (gate/up ``[2 x FFN, H]``, down ``[H, FFN]``, hidden 512, FFN 1536 as in
``bench_bundled.py``) on ``M`` tokens, fp32, 1 thread, hot weights; the first quartile of interleaved
rounds. A dense MLP runs its whole batch through one product; a top-1 MoE with E experts gives each
expert about batch / E rows, so the ratio of the per-token costs at those two row counts is a floor for
the MoE block against the dense MLP. ``--transposed`` also times the same products as ``W @ x.T``.

    python benchmarks/bench_expert_rows.py --rows 16,32,64,128,256,512
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _quartile(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 4] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,32,64,128,256,512")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--transposed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gate_up = torch.randn(2 * args.intermediate, args.hidden)
    down = torch.randn(args.hidden, args.intermediate)
    print(f"{'rows':>5s} {'ms':>8s} {'ms/token':>9s}" + ("  transposed/linear" if args.transposed else ""))
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.hidden)

        def linear():
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, down)

        def transposed():
            gate, up = (gate_up @ x.t()).chunk(2, dim=0)
            return (down @ (F.silu(gate) * up)).t()

        fns = {"linear": linear, "transposed": transposed} if args.transposed else {"linear": linear}
        q = _quartile(fns, max(20, 3000 // rows))
        extra = f"  {q['transposed'] / q['linear']:.2f}" if args.transposed else ""
        print(f"{rows:5d} {q['linear'] * 1e3:8.3f} {q['linear'] * 1e3 / rows:9.4f}{extra}")


if __name__ == "__main__":
    main()
