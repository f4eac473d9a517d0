"""Expert-load balance with and without the load-balancing loss, on the tiny test model (CPU, ~1 minute).

    python benchmarks/aux_loss_balance.py [--train routers|all] [--lr 1e-2] [--router-std 0.5]

Converts a tiny random llama (tests/factories.py) into a 4-expert top-2 Mixtral, trains it twice with the
same seed (aux-loss coefficient 0 and 1) and prints the mean coefficient of variation of the expert load
before and after, measured with upcycle.train.measure_routing on the training text.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from factories import make_dense, save_tiny_tokenizer  # noqa: E402

from upcycle.convert import convert  # noqa: E402
from upcycle.train import measure_routing, train  # noqa: E402

WORDS = "the a of to and in is it that was for on are as with his they at be this from".split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", default="routers")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--router-std", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = make_dense("llama", tmp / "dense")
        save_tiny_tokenizer(dense)
        convert(dense, tmp / "moe", num_experts=4, top_k=2, router_std=args.router_std, quiet=True)
        data = tmp / "data.txt"
        data.write_text("\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(10 + (7 * i) % 30))
                                  for i in range(300)))
        print(f"before training: load cv {measure_routing(tmp / 'moe', data, seq_len=32)['cv_mean']:.3f}")
        for coef in (0.0, 1.0):
            out = tmp / f"aux{coef}"
            train(tmp / "moe", data, out, max_steps=args.steps, seq_len=32, batch_size=8, learning_rate=args.lr,
                  aux_loss_coef=coef, train=args.train, logging_steps=5, save_steps=10**6, quiet=True)
            cv = measure_routing(out, data, seq_len=32)["cv_mean"]
            print(f"--train {args.train} --aux-loss-coef {coef}: load cv {cv:.3f}")


if __name__ == "__main__":
    main()
