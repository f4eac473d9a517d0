"""The ``upcycle push`` command: publish a conversion output to the Hugging Face Hub."""

from __future__ import annotations

from typing import Optional

import click

from .cli_common import _human, _user_errors


def echo_pushed(result) -> None:
    """Print where a push landed (shared with ``convert --push-to-hub``)."""
    click.echo(f"pushed {len(result.files)} files ({_human(result.bytes, 'B')}) to {result.url}")
    if result.pr_url:
        click.echo(f"  pull request: {result.pr_url}")
    elif result.commit_url:
        click.echo(f"  commit: {result.commit_url}")


@click.command()
@click.argument("path", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created from main if missing).  [default: main]")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--commit-message", help="Commit title.")
@click.option("--token", help="Hub token with write access.  [default: HF_TOKEN, then the `hf auth login` cache]")
@click.option("--large-threshold", default="5GB", show_default=True,
              help="On huggingface_hub 1.x, folders larger than this use the resumable upload_large_folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_user_errors
def push(path: str, repo_id: str, private: bool, revision: Optional[str], create_pr: bool,
         commit_message: Optional[str], token: Optional[str], large_threshold: str, quiet: bool) -> None:
    """Upload the upcycle output at PATH to the Hub model repo REPO_ID (namespace/name).

    The folder must be a complete conversion output (all shards present, sizes matching). HF_ENDPOINT
    is honoured. If the upload fails, run the same command again: it resumes.
    """
    from .hub_push import push as run_push

    echo_pushed(run_push(path, repo_id, private=private, revision=revision, create_pr=create_pr,
                         commit_message=commit_message, token=token, large_threshold=large_threshold,
                         quiet=quiet))
