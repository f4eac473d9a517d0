"""The ``upcycle merge`` command: experts from several fine-tunes of one base (own or mergekit-moe config)."""

from __future__ import annotations

import json
import signal
from typing import Any, Optional

import click

from .cli_common import TARGET_CHOICES, RegistryOption, _human, _terminate_as_interrupt, _user_errors


@click.command(name="merge")
@click.argument("config", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--target", cls=RegistryOption, choices=TARGET_CHOICES,
              help="Output architecture: auto (picks as convert does), {choices}.  [default: auto]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Output dtype.  [default: the config's, else auto]")
@click.option("--seed", type=int, help="Seed of random router rows and expert noise.  [default: 0]")
@click.option("--force", is_flag=True, help="Replace a non-empty OUTPUT folder.")
@click.option("--dry-run", is_flag=True, help="Check the config and every source's headers; print the plan.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verify/--no-verify", default=None,
              help="Measure each source's deviation and the routing specificity, one layer at a time.  [default: on]")
@click.option("--push-to-hub", metavar="REPO_ID", help="Then upload the output to this Hub model repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--base-model", "card_base_model", metavar="REPO_ID", multiple=True,
              help="A Hub id for the card's base_model; repeat it to list several (not the base source: that is "
                   "the config's base_model).  [default: the sources' ids, derived as convert does]")
@_user_errors
def merge_cmd(config: str, output: str, target: Optional[str], dtype: Optional[str], seed: Optional[int],
              force: bool, dry_run: bool, as_json: bool, quiet: bool, verify: Optional[bool],
              push_to_hub: Optional[str], private: bool, card_base_model: tuple[str, ...]) -> None:
    """Merge the fine-tunes listed in CONFIG (upcycle's YAML/JSON or mergekit-moe's YAML) into an MoE at OUTPUT.

    Expert e holds source e's FFN; embeddings, attention and norms are the base's (or their average).
    """
    from .merge import merge as run_merge
    from .quiet import quiet_libraries

    if quiet:
        quiet_libraries()
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    result = run_merge(config, output, force=force, dry_run=dry_run, quiet=quiet, verify=verify,
                       push_to_hub=push_to_hub, hub_private=private, target=target, dtype=dtype, seed=seed,
                       card_base_model=card_base_model or None)
    s, v = result.summary, result.verification
    if as_json:
        click.echo(json.dumps({**s, "output": str(result.output) if result.output else None, "dry_run": dry_run,
                               "files": result.files, "verification": v, "notes": list(result.config.notes),
                               "pushed": result.pushed.url if result.pushed else None}, indent=2))
        return
    for note in result.config.notes:
        click.echo(f"note: {note}", err=True)
    head = "plan (dry run, nothing written)" if dry_run else f"wrote {output}"
    click.echo(f"{head}: {s['family']} -> {s['architecture']} ({s['target']}), {s['num_experts']} experts from "
               f"{len(s['sources'])} source(s), top-{s['top_k']}, router {s['router_init']}, "
               f"shared weights: {s['shared_weights']} ({s['base_model']})")
    for index, source in enumerate(s["experts"]):
        click.echo(f"  expert {index}: {source}")
    click.echo(f"  parameters: {_human(s['total_params'])} total, {_human(s['active_params'])} active per token")
    click.echo(f"  output: {_human(s['output_bytes'], 'B')} in {s['shards']} shard(s), dtype {s['dtype']}")
    _echo_verification(v)
    if result.pushed:
        from .cli_push import echo_pushed

        echo_pushed(result.pushed)


def _echo_verification(v: Optional[dict[str, Any]]) -> None:
    if not v:
        return
    if "skipped" in v:
        click.echo(f"  verification: skipped ({v['skipped']})")
        return
    if "base" in v:
        click.echo(f"  identical sources: max |Δlogit| vs the base {v['base']['max_abs_logit_diff']:.3g}")
    for row in v["sources"]:
        kind = "exact expected" if row["exact_expected"] else "measured"
        click.echo(f"  every token to expert {row['expert']}: max |Δlogit| vs {row['source']} "
                   f"{row['max_abs_logit_diff']:.3g} ({kind})")
    if "specificity" in v:
        sp = v["specificity"]
        click.echo(f"  routing specificity (share of each expert's prompt tokens sent to it, top-1): "
                   f"{sp['mean_top1']:.2f} mean over layers (chance {sp['chance_top1']:.2f})")
