"""``upcycle train``: fine-tune an upcycled MoE (registered in cli.py)."""

from __future__ import annotations

import json
from typing import Any

import click

from .cli_common import _user_errors


@click.command(name="train")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Text file, JSONL ('text' or 'input_ids') or a folder of them.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Folder for the trained model (checkpoints in OUTPUT/checkpoints).")
@click.option("--max-steps", type=int, default=-1, show_default=True, help="Optimizer steps; -1 trains --epochs.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the data (when --max-steps is -1).")
@click.option("--learning-rate", "--lr", type=float, default=2e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per device per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, help="Tokens per packed sequence.  [default: 1024, or the model's "
              "max_position_embeddings when smaller]")
@click.option("--warmup", type=int, default=0, show_default=True, help="Warm-up steps of the linear schedule.")
@click.option("--bf16", is_flag=True, help="bfloat16 mixed precision.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--save-steps", type=int, default=500, show_default=True, help="Checkpoint every N steps.")
@click.option("--logging-steps", type=int, default=10, show_default=True, help="Log loss and expert load every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUTPUT/checkpoints.")
@click.option("--force", is_flag=True, help="Train into a non-empty OUTPUT folder.")
@click.option("--aux-loss-coef", type=float, help="Load-balancing loss coefficient.  [default: the model's router_aux_loss_coef]")
@click.option("--z-loss-coef", type=float, default=0.0, show_default=True, help="Router z-loss coefficient (ST-MoE uses 1e-3).")
@click.option("--train", "train_groups", default="all", show_default=True,
              help="Parameters to train, comma-separated: experts, routers, attention, embeddings, norms, all.")
@click.option("--lora", is_flag=True, help="Train LoRA adapters (peft) on linear layers plus the routers; merged on save.")
@click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=int, default=32, show_default=True, help="LoRA alpha.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the data order (and LoRA init).")
@click.option("--report-to", default="none", show_default=True, help="Trainer loggers: none, tensorboard, wandb, ...")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_user_errors
def train_cmd(model: str, data: str, output: str, train_groups: str, as_json: bool, **options: Any) -> None:
    """Fine-tune the MoE checkpoint MODEL (e.g. the output of `upcycle convert`) on --data.

    Runs on transformers' Trainer: launch with `torchrun --nproc_per_node N -m upcycle train ...` or
    `accelerate launch -m upcycle train ...` for several processes (DDP, FSDP, DeepSpeed).
    """
    from .quiet import quiet_libraries
    from .train.run import TrainOptions, train

    if options["quiet"]:
        quiet_libraries()
    if options["seq_len"] is None and _is_main_process():
        _say_default_seq_len(model)
    result = train(model, data, output, TrainOptions(train=train_groups, **options))
    if not _is_main_process():
        return
    run = result.run
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    click.echo(f"wrote {result.output}: {run['steps']} steps on {run['tokens']} tokens, final loss "
               f"{run['final_loss']:.4f}" if run["final_loss"] is not None else f"wrote {result.output}")
    load = run["expert_load"]
    if load:
        click.echo(f"  expert load (last window): cv {load['cv_mean']:.3f} (max {load['cv_max']:.3f}), shares "
                   f"{load['min_share']:.3f}..{load['max_share']:.3f} (uniform {1 / load['num_experts']:.3f})")


def _say_default_seq_len(model: str) -> None:
    """Say on stderr which --seq-len train() will choose for MODEL (nothing without a config: train() says why)."""
    from pathlib import Path

    from transformers import AutoConfig

    from .checkpoint import CONFIG_FILE
    from .train.moe_model import choose_seq_len

    if (Path(model) / CONFIG_FILE).is_file():
        click.echo(choose_seq_len(AutoConfig.from_pretrained(model), None)[1], err=True)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def routing_report(model: str, data: str, heatmap: str, seq_len: int, max_tokens: int, device: str = "cpu",
                   dtype: str = "float32") -> dict[str, Any]:
    """``inspect --routing``: measure the expert load on ``data`` (one layer in memory at a time) and write
    the heatmap PNG."""
    from .quiet import quiet_libraries
    from .train.routing_heatmap import measure_routing, plot_routing_heatmap

    quiet_libraries()
    stats = measure_routing(model, data, seq_len=seq_len, max_tokens=max_tokens, device=device, dtype=dtype)
    stats["heatmap"] = str(plot_routing_heatmap(stats, heatmap))
    return stats
