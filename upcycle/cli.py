"""The ``upcycle`` command line: thin click commands over the Python API.

Heavy libraries (torch, transformers) are imported inside the commands so that ``upcycle --help``
starts fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

from .version import __version__
from .cli_common import (METHOD_CHOICES, PARTITION_CHOICES, ROUTER_CHOICES, TARGET_CHOICES, RegistryOption, _human,
                         _terminate_as_interrupt, _user_errors, parse_options)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="upcycle")
def cli() -> None:
    """Turn dense Hugging Face causal language models into Mixture-of-Experts models."""


@cli.command()
@click.argument("source")
@click.argument("output", type=click.Path())
@click.option("--num-experts", "-e", type=int, help="Experts per MoE layer.  [default: 8]")
@click.option("--top-k", "-k", type=int, help="Experts chosen per token.  [default: 2]")
@click.option("--method", cls=RegistryOption, choices=METHOD_CHOICES,
              help="Expert construction: {choices}.  [default: replicate]")
@click.option("--target", cls=RegistryOption, choices=TARGET_CHOICES,
              help="Output architecture: auto (the exact native one, else the bundled model), {choices}.  "
                   "[default: auto]")
@click.option("--router-init", cls=RegistryOption, choices=ROUTER_CHOICES,
              help="Router init: {choices}.  [default: normal]")
@click.option("--router-std", type=float, help="Std of the normal router init.  [default: 0.02]")
@click.option("--seed", type=int, help="Seed: same inputs and seed give byte-identical files.  [default: 0]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Output dtype; auto keeps the source's (GGUF: float32).  [default: auto]")
@click.option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB.  [default: 5GB]")
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
@click.option("--granularity", "-g", type=int, help="split: FFN segments per dense FFN (divides its width).  [default: 1]")
@click.option("--split-strategy", cls=RegistryOption, choices=PARTITION_CHOICES,
              help="split: how neurons are cut into segments: {choices}.  [default: contiguous]")
@click.option("--shared-experts", type=int, help="split: segments made an always-on shared expert.  [default: 0]")
@click.option("--allow-inexact", is_flag=True, default=None, help="Accept a top-k or router that breaks exactness.")
@click.option("--drop-ratio", type=float, help="drop: fraction of neurons re-initialised per expert.  [default: 0.5]")
@click.option("--noise-std", type=float, help="Gaussian noise std added to every expert (not exact).  [default: 0]")
@click.option("--layers", help="MoE layers: all, every:N, 0,2,5 or 4-11.  [default: all]")
@click.option("--calibration", help="Text, JSONL ('text') or folder for kmeans router / activation split.")
@click.option("--calibration-tokens", type=int, help="Most calibration tokens to read.  [default: 16384]")
@click.option("--option", "-o", "extra_options", multiple=True, metavar="KEY=VALUE",
              help="Any recipe key, e.g. an expert method's own option (repeatable): -o drop_ratio=0.3.")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe file (YAML/JSON); flags override it.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUTPUT folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan without writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verify/--no-verify", default=None,
              help="Compare the MoE with the dense model, layer by layer, before finishing.  [default: on]")
@click.option("--device", default="cpu", show_default=True,
              help="Where calibration and the check run: cpu, cuda, cuda:N, mps or auto.")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Precision of calibration and the check (not of the output: see --dtype).")
@click.option("--push-to-hub", metavar="REPO_ID", help="Then upload the output to this Hub model repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--base-model", metavar="REPO_ID", help="The dense model's Hub id for the card's base_model.  "
              "[default: SOURCE's id, derived from a HF cache folder or config _name_or_path]")
@_user_errors
def convert(source: str, output: str, recipe_file: str | None, force: bool, dry_run: bool, as_json: bool,
            quiet: bool, verify: bool | None, push_to_hub: str | None, private: bool, device: str,
            compute_dtype: str, base_model: str | None, extra_options: tuple[str, ...], **options: Any) -> None:
    """Convert the dense model SOURCE (folder, .gguf file or Hub repo id) into an MoE at OUTPUT."""
    from .quiet import quiet_libraries
    from .convert import convert as run_convert

    if quiet:
        quiet_libraries()
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    options = {**parse_options(extra_options), **{k: v for k, v in options.items() if v is not None}}
    result = run_convert(source, output, recipe_file, force=force, dry_run=dry_run, quiet=quiet, verify=verify,
                         push_to_hub=push_to_hub, hub_private=private, device=device, compute_dtype=compute_dtype, base_model=base_model,
                         **options)
    s = result.summary
    from .engines import engine_warnings

    limits = engine_warnings(s)
    for line in limits:  # known engine limits the plan hits (docs/engines.md)
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps({**s, "engine_limits": limits, "output": str(result.output) if result.output else None,
                               "dry_run": dry_run, "files": result.files, "verification": result.verification,
                               "pushed": result.pushed.url if result.pushed else None}, indent=2))
        return
    head = "plan (dry run, nothing written)" if dry_run else f"wrote {output}"
    click.echo(f"{head}: {s['family']} -> {s['architecture']} ({s['target']}), method {s['method']}, "
               f"{'exact' if s['exact'] else 'not exact'}")
    click.echo(f"  layers: {len(s['moe_layers'])}/{s['num_layers']} MoE; experts: {s['num_experts']} x "
               f"{s['expert_size']} (dense FFN {s['dense_ffn_size']}), top-{s['top_k']}"
               + (f", shared expert {s['shared_expert_size']}" if s.get("shared_expert_size") else ""))
    click.echo(f"  parameters: {_human(s['total_params'])} total, {_human(s['active_params'])} active per token")
    click.echo(f"  output: {_human(s['output_bytes'], 'B')} in {s['shards']} shard(s), dtype {s['dtype']}")
    if result.verification:
        from .card import verification_text

        click.echo(f"  verification: {verification_text(result.verification, s['exact'])}")
    if result.pushed:
        from .cli_push import echo_pushed

        echo_pushed(result.pushed)


@cli.command()
@click.argument("dense")
@click.argument("moe", type=click.Path())
@click.option("--prompts", type=click.Path(), help="Text file (one prompt per line) or JSONL with 'text'.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Greedy tokens to compare.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Precision both models run in.")
@click.option("--atol", type=float, help="Largest |Δlogit| that passes for an exact recipe.  [default: 1e-3 at fp32]")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--memory-budget", type=float,
              help="GB a whole model may take for greedy generation; above it the next-token predictions of the "
                   "prompts are compared instead.  [default: half the free memory]")
@click.option("--force-expert", type=int, help="Send every token to this expert (compare a merge with its source).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_user_errors
def verify(dense: str, moe: str, prompts: str | None, max_new_tokens: int, dtype: str, atol: float | None,
           device: str, memory_budget: float | None, force_expert: int | None, as_json: bool, quiet: bool) -> None:
    """Check that MOE computes what DENSE computed: max |Δlogit|, mean KL, greedy agreement, per layer.

    Both models run one decoder layer at a time, so any size fits. Exits 1 when any value is NaN or
    infinite, or when MOE's recipe claims exactness and the logits differ by more than --atol.
    """
    from .quiet import quiet_libraries
    from .verify import read_prompts, report_text
    from .verify import verify as run_verify

    import math

    from .errors import RecipeError

    for flag, value in (("--atol", atol), ("--memory-budget", memory_budget)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise RecipeError(f"{flag} must be a finite number >= 0, got {value}")  # nan/inf were a traceback
    quiet_libraries(progress=not quiet)
    budget = int(memory_budget * 1e9) if memory_budget is not None else None
    report = run_verify(dense, moe, read_prompts(prompts) if prompts else None, max_new_tokens=max_new_tokens,
                        dtype=dtype, atol=atol, device=device, quiet=quiet, generation_budget=budget,
                        force_expert=force_expert)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report_text(report))
    if not report.passed:
        sys.exit(1)


@cli.command(name="inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--routing", type=click.Path(), help="Measure expert load on this data (text/JSONL/folder) and draw it.")
@click.option("--heatmap", type=click.Path(), default="routing_heatmap.png", show_default=True,
              help="PNG written by --routing (layers x experts).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Sequence length for --routing.")
@click.option("--max-tokens", type=int, default=65536, show_default=True, help="Tokens of --routing data to use.")
@click.option("--device", default="cpu", show_default=True, help="--routing runs here: cpu, cuda, cuda:N, mps or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Precision --routing runs in.")
@_user_errors
def inspect_cmd(path: str, as_json: bool, routing: str | None, heatmap: str, seq_len: int, max_tokens: int,
                device: str, dtype: str) -> None:
    """Describe the MoE checkpoint at PATH: layers, experts, parameters, bytes, recipe."""
    from .inspection import inspect as run_inspect

    info = run_inspect(path)
    if routing:
        from .cli_train import routing_report

        info["routing"] = routing_report(path, routing, heatmap, seq_len, max_tokens, device=device, dtype=dtype)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    moe = info["moe_layers"]
    click.echo(f"{info['path']}: {info['architecture']} ({info['model_type']})"
               + (f", upcycled from {info['source']} ({info['family']})" if info["source"] else ""))
    click.echo(f"  layers: {len(moe)}/{info['num_layers']} MoE {moe if len(moe) != info['num_layers'] else '(all)'}")
    click.echo(f"  experts: {info['num_experts']} x {info['expert_size']}, top-{info['top_k']}")
    click.echo(f"  parameters: {_human(info['total_params'])} total, {_human(info['active_params'])} active per token")
    click.echo(f"  on disk: {_human(info['bytes_on_disk'], 'B')}, dtype {info['dtype']}")
    if info["recipe"]:
        r = info["recipe"]
        click.echo(f"  recipe: method {r.get('method')}, router {r.get('router_init')}, seed {r.get('seed')}, "
                   f"{'exact' if info['exact'] else 'not exact'}")
    if info.get("note"):
        click.echo(f"  note: {info['note']}")
    if routing:
        r = info["routing"]
        click.echo(f"  routing on {routing} ({r['tokens']} tokens): load cv {r['cv_mean']:.3f} (max {r['cv_max']:.3f}), "
                   f"shares {r['min_share_overall']:.3f}..{r['max_share_overall']:.3f}; heatmap: {r['heatmap']}")


def main() -> None:
    # Transparent huge pages for torch's large CPU tensors (its allocator reads this once, at the first large
    # allocation, so it is set before any): the layer-streamed runner allocates and frees a layer's tensors
    # per step, and with 4 KiB pages the kernel spends most of that in page faults. On the 1.1B x8 verify
    # this took system CPU from 70 s to 27 s and wall time from 271 s to 136 s at the same peak RSS
    # (docs/benchmarks.md). A no-op where the kernel has no THP; a user's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    cli(prog_name="upcycle")


from .cli_push import push as _push_command  # noqa: E402 - registered after the group is defined

cli.add_command(_push_command)

from .cli_train import train_cmd  # noqa: E402  (its own module; imports only click)
cli.add_command(train_cmd)

from .cli_merge import merge_cmd  # noqa: E402  (its own module; imports only click)
cli.add_command(merge_cmd)
