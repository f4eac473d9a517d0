"""Fine-tune an upcycled MoE with TRL's SFTTrainer, the router load-balancing loss included.

    pip install trl
    python examples/trl_sft.py ./smol-8x data.txt ./smol-8x-sft --max-steps 200 --aux-loss-coef 0.01

DATA is a text file (one example per line) or JSONL with a ``text`` field. SFTTrainer adds
``router_aux_loss_coef x aux_loss`` to the language-model loss when the model config has
``output_router_logits`` (TRL >= 1.x reads the coefficient from ``SFTConfig.router_aux_loss_coef``, else from the
config); both are set here, and the logged ``aux_loss`` shows the balancing loss it trained with.
Works with the native targets (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) and the bundled model (``--target upcycle``),
whose remote-code files are copied into the output so that it still loads with ``trust_remote_code``.
TRL weights its own balancing loss (Mixtral's formula, about k when balanced) and not the router z-loss;
see docs/training.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_texts(path: Path) -> list[str]:
    """Lines of a text file, or the ``text`` field of each JSONL record."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in lines]
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an upcycled MoE folder (upcycle convert output)")
    parser.add_argument("data", type=Path)
    parser.add_argument("output")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss weight")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import upcycle  # noqa: F401 - registers the bundled model class, for --target upcycle outputs
    from upcycle.train.provenance import copy_code_files

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.output_router_logits = True  # the model returns its router logits and the aux loss
    model.config.router_aux_loss_coef = args.aux_loss_coef
    config = SFTConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, learning_rate=args.learning_rate, logging_steps=1, save_strategy="no",
                       report_to="none", bf16=args.bf16, router_aux_loss_coef=args.aux_loss_coef,
                       use_cpu=not torch.cuda.is_available())
    dataset = Dataset.from_dict({"text": load_texts(args.data)})
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    model.config.output_router_logits = False  # a plain inference config in the saved model
    trainer.save_model(args.output)
    copy_code_files(Path(args.model), Path(args.output))  # the bundled model's remote code, for trust_remote_code
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": trainer.state.global_step, "aux_loss_enabled": trainer.aux_loss_enabled,
               "router_aux_loss_coef": trainer.router_aux_loss_coef,
               "losses": [h["loss"] for h in history], "aux_losses": [h.get("aux_loss") for h in history]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
