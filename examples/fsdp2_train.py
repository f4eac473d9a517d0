"""Train an upcycled MoE with PyTorch FSDP2 (``fully_shard``) directly, on CPU (gloo) or GPUs (nccl).

accelerate (and so ``upcycle train``) enables FSDP only on GPU-like devices: on a CPU-only machine it runs
DDP instead (``upcycle train`` refuses that combination; see docs/training.md). This script shards with
torch's own FSDP2 API, which works over gloo too: each decoder layer (the model's ``_no_split_modules``)
is one FSDP unit, then the root. Every rank reads its own slice of each global batch; the final weights
are gathered into a full state dict on rank 0 and saved with ``save_pretrained``.

    torchrun --nproc_per_node 2 examples/fsdp2_train.py MOE DATA.txt OUT --steps 20 --seq-len 64

The loss is the language-model loss plus ``config.router_aux_loss_coef`` (or ``--aux-loss-coef``) times the
load-balancing loss (``output_router_logits=True``), as the model computes it. The balancing loss is computed
per rank, so with it on, N ranks are not bit-for-bit one process on the whole batch; without it they are
(up to float rounding).
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist


def _batches(path: Path, tokenizer, seq_len: int, batch: int, steps: int) -> torch.Tensor:
    """``steps`` global batches ``[steps, batch, seq_len]`` of packed tokens (the same on every rank)."""
    ids = tokenizer(path.read_text())["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    need = steps * batch
    blocks = blocks.repeat((need + len(blocks) - 1) // len(blocks), 1)[:need]
    return blocks.view(steps, batch, seq_len)


def _train(args, rank: int, world: int, device: torch.device) -> list[float]:
    """Shard, train ``args.steps`` steps and save the full weights on rank 0; returns the mean loss per step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.config.use_cache = False
    model.config.output_router_logits = True
    if args.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.aux_loss_coef
    units = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in units:
            fully_shard(module)
    fully_shard(model)
    optimizer = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=args.lr)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = _batches(Path(args.data), tokenizer, args.seq_len, args.batch_size, args.steps)
    per_rank = args.batch_size // world
    losses = []
    model.train()
    for step in range(args.steps):
        ids = data[step, rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP averages the gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}", flush=True)

    shard = next(iter(model.parameters()))
    if rank == 0:
        print(f"sharded: {type(shard).__name__} placements {getattr(shard, 'placements', None)}, local "
              f"{tuple(shard.to_local().shape)} of {tuple(shard.shape)} over {world} process(es)", flush=True)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.config.output_router_logits = False
        model.config.use_cache = True
        fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        fresh.load_state_dict(state)
        fresh.config.output_router_logits, fresh.config.use_cache = False, True
        fresh.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="global sequences per step (divisible by ranks)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--aux-loss-coef", type=float, help="override config.router_aux_loss_coef")
    args = parser.parse_args()

    import upcycle  # noqa: F401 - registers the bundled model class

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    losses = _train(args, rank, world, device)
    if rank == 0:
        print(f"wrote {args.output}: {args.steps} steps, final loss {losses[-1]:.4f}", flush=True)
    # Teardown order matters on gloo: the sharded model, optimizer and gathered state (which hold the
    # collectives' work handles and their tensors) are gone once _train returns; collect them now, while the
    # process group still exists, so no gloo work object outlives it into interpreter shutdown (where its
    # destructor can abort the process: "terminate called without an active exception").
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
