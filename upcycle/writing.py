"""The output steps ``convert`` and ``merge`` share: stream a plan's tensors into the output's shards, and push
the finished folder to the Hub with the command that resumes a failed upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .checkpoint import INDEX_FILE
from .errors import HubError
from .hub_push import push
from .io.writer import write_shards
from .tensors import SourceCache


def write_weights(folder: Path, plan, src, quiet: bool) -> list[str]:
    """Write every tensor of ``plan`` into safetensors shards under ``folder``, one tensor at a time, reading
    ``src`` (a dense source, or a merge's several); returns the file names written (the index too when sharded)."""
    from tqdm.auto import tqdm

    by_name = {t.spec.name: t for t in plan.tensors}
    shards = plan.shards()
    cache = SourceCache(src.read, views=plan.source_views)
    total = sum(t.spec.nbytes for t in plan.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing experts", disable=quiet) as bar:
        names = write_shards(folder, shards, lambda spec: _produce(by_name[spec.name], src, cache), bar.update)
    return names + ([INDEX_FILE] if len(names) > 1 else [])


def _produce(tensor, src, cache):
    """The tensor's data: the source's stored bytes when it is an unchanged copy, else computed."""
    stored = src.stored(tensor.copy_of) if tensor.copy_of is not None else None
    if stored is not None and stored.dtype == tensor.spec.dtype:
        return stored
    return tensor.make(cache)


def push_output(output: Path, repo_id: str, private: bool, token: Optional[str], quiet: bool) -> Any:
    """:func:`upcycle.hub_push.push` the finished ``output``; a Hub failure says the output is complete and how
    to resume the upload."""
    try:
        return push(output, repo_id, private=private, token=token, quiet=quiet)
    except HubError as exc:
        raise HubError(f"converted to {output}, but {exc.reason}; to push it (resuming), run "
                       f"`upcycle push {output} {repo_id}`") from None
