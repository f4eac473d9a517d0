"""Publish an upcycle output folder to the Hugging Face Hub.

The folder is checked first (every shard of the index present, sizes matching the safetensors
headers, config and recipe present), then uploaded with huggingface_hub: ``create_repo`` and
``upload_folder`` (with ``hf_xet`` installed, huggingface_hub >= 2 streams it in resumable batches);
on huggingface_hub 1.x, folders over ``large_threshold`` go through the resumable
``upload_large_folder``. Token, endpoint and offline mode come from the usual places (``--token``,
``HF_TOKEN``, the ``hf auth login`` cache; ``HF_ENDPOINT``; ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .card import REPO_PLACEHOLDER
from .checkpoint import CARD_FILE, CONFIG_FILE, INDEX_FILE, RECIPE_FILE, SINGLE_FILE, weight_files
from .errors import HubError, IncompleteOutputError

DEFAULT_LARGE_THRESHOLD = "5GB"
HIDDEN = [".*", "*/.*"]  # temp files, editor and OS droppings, upload_large_folder's own .cache
RESUME_HINT = "run the same command again to resume: files already on the Hub are not sent again"


@dataclass
class PushResult:
    """What a push sent and where it landed."""

    repo_id: str
    url: str
    revision: str
    commit_url: Optional[str]
    pr_url: Optional[str]
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def _shard_extent(file: Path) -> tuple[int, dict[str, int]]:
    """Where the data of a safetensors file ends according to its header, and each tensor's byte count.

    Reads only the header (8-byte length, JSON), so that pushing never needs torch.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise IncompleteOutputError(f"{file}: truncated safetensors file ({size} bytes); re-run the conversion")
        try:
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            offsets = {name: (int(e["data_offsets"][0]), int(e["data_offsets"][1])) for name, e in header.items()}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise IncompleteOutputError(f"{file}: malformed safetensors header; re-run the conversion") from None
    end = 8 + header_len + max((stop for _, stop in offsets.values()), default=0)
    return end, {name: stop - start for name, (start, stop) in offsets.items()}


def check_complete(path: str | Path) -> list[str]:
    """Refuse a folder that is not a complete upcycle output; return its files (relative, sorted).

    Checks: ``config.json`` and ``upcycle_recipe.json`` present and valid JSON; every shard the index
    names present, each shard's size equal to what its safetensors header promises, every tensor
    of the index inside the shard it is mapped to, and the tensor bytes summing to ``total_size``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise IncompleteOutputError(f"{path}: no such folder")
    for name in (CONFIG_FILE, RECIPE_FILE):
        if not (folder / name).is_file():
            what = "not a model folder" if name == CONFIG_FILE else "not an upcycle output"
            raise IncompleteOutputError(f"{folder}: {what} (no {name}); push the folder `upcycle convert` wrote")
        try:
            json.loads((folder / name).read_text())
        except ValueError:
            raise IncompleteOutputError(f"{folder / name}: not valid JSON; re-run the conversion") from None
    weights = weight_files(folder, error=IncompleteOutputError)
    if weights is None:
        raise IncompleteOutputError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is the conversion finished?")
    missing = weights.missing(folder)
    if missing:
        raise IncompleteOutputError(f"{folder}: {len(missing)} shard(s) named in the index are missing "
                                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); re-run the conversion")
    weight_map, tensor_bytes = weights.weight_map, 0
    for shard in weights.files:
        file = folder / shard
        end, tensors = _shard_extent(file)
        size = file.stat().st_size
        if size != end:
            raise IncompleteOutputError(f"{file}: {size} bytes, but its safetensors header describes {end}; "
                                        "the file is truncated or damaged, re-run the conversion")
        tensor_bytes += sum(tensors.values())
        if weight_map is not None:
            absent = [k for k, v in weight_map.items() if v == shard and k not in tensors]
            if absent:
                raise IncompleteOutputError(f"{file}: the index maps {absent[0]!r} to this shard but it is not "
                                            "in it; re-run the conversion")
    if weights.total_size is not None and weights.total_size != tensor_bytes:
        raise IncompleteOutputError(f"{folder / INDEX_FILE}: total_size {weights.total_size} but the shards hold "
                                    f"{tensor_bytes} tensor bytes; re-run the conversion")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def resolve_token(token: Optional[str] = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the ``hf auth login`` cache."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token "
                       "(a token with write access)")
    return token


def check_repo_id(repo_id: str) -> str:
    """Refuse a malformed repo id before any network call."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"malformed repo id {repo_id!r}: use 'namespace/name' (letters, digits, '-', '_', '.'; "
                       "at most 96 characters)") from None
    return repo_id


def check_can_push(repo_id: str, token: Optional[str] = None) -> str:
    """Offline pre-flight for ``convert --push-to-hub``: repo id well formed, token present, not offline."""
    from huggingface_hub import constants

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set: unset it to push to the Hub")
    return resolve_token(token)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection/timeout errors (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _explain(exc: BaseException, repo_id: str, endpoint: str) -> tuple[str, bool]:
    """What went wrong with the Hub (from the first meaningful error in the chain), and whether
    running again can help (network and server errors) or something must be fixed first."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        if isinstance(err, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE=1 is set: unset it to push to the Hub", False
        if isinstance(err, RevisionNotFoundError):
            return f"{repo_id}: revision not found on the Hub", False
        if isinstance(err, RepositoryNotFoundError):
            return f"{repo_id}: repository not found, or the token may not write to it", False
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            status = err.response.status_code
            if status == 401:
                return f"the Hub at {endpoint} rejected the token (HTTP 401): check HF_TOKEN or run `hf auth login`", False
            if status == 403:
                return f"the token may not write to {repo_id} (HTTP 403): use a write token for that namespace", False
            detail = (err.server_message or "").strip().splitlines()
            return f"the Hub at {endpoint} answered HTTP {status}{': ' + detail[0] if detail else ''}", status >= 500
        if isinstance(err, _transport_errors()):
            return f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err or 'connection failed'})", True
    return f"{type(exc).__name__}: {exc}", True


def _fill_card(folder: Path, repo_id: str) -> None:
    """Put the repo id into the model card's code samples (only the card upcycle wrote)."""
    card = folder / CARD_FILE
    if not card.is_file():
        return
    text = card.read_text()
    quoted = f'"{REPO_PLACEHOLDER}"'
    if quoted in text:
        tmp = card.with_name(".README.md.upcycle-tmp")
        tmp.write_text(text.replace(quoted, f'"{repo_id}"'))
        os.replace(tmp, card)


def _remote_sizes(api: Any, repo_id: str, revision: str) -> dict[str, int]:
    return {f.path: f.size for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
            if hasattr(f, "size") and getattr(f, "size", None) is not None}


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         create_pr: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None,
         large_threshold: str | int = DEFAULT_LARGE_THRESHOLD, quiet: bool = False) -> PushResult:
    """Upload the upcycle output at ``path`` to the Hub model repo ``repo_id`` (created if needed).

    ``revision`` is a branch (created from ``main`` if missing); ``create_pr`` opens a pull request
    against ``main`` instead of committing to it. Raises :class:`IncompleteOutputError` for an
    incomplete folder and :class:`HubError` (one line, nothing claimed as pushed) for a missing token,
    a malformed repo id, an unreachable endpoint or a server error; calling again resumes.
    """
    from .recipe import parse_size  # on use: recipe imports torch (through experts); a push needs no torch

    folder = Path(path)
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise HubError("--create-pr opens a pull request against main; drop --revision, or push to the "
                       "branch without --create-pr")
    limit = parse_size(large_threshold)
    files = check_complete(folder)
    token = resolve_token(token)

    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    api = HfApi(token=token)
    endpoint = api.endpoint
    message = commit_message or f"Upload upcycled MoE ({len(files)} files) with upcycle"
    branch = revision or "main"
    if quiet:
        disable_progress_bars()
    try:
        repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        repo_id = repo_url.repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        _fill_card(folder, repo_id)
        size = sum((folder / f).stat().st_size for f in files)
        if size > limit and not create_pr and hasattr(api, "upload_large_folder"):  # huggingface_hub 1.x
            api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                    private=private, ignore_patterns=HIDDEN)
            commit_url, pr_url, landed = None, None, branch
        else:
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message,
                                     revision=revision, create_pr=create_pr, ignore_patterns=HIDDEN)
            commit_url, pr_url = info.commit_url, info.pr_url
            landed = info.pr_revision or branch
        remote = _remote_sizes(api, repo_id, landed)
    except (HubError, IncompleteOutputError):
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one line
        reason, transient = _explain(exc, repo_id, endpoint)
        raise HubError(f"push to {repo_id} did not complete: {reason}", RESUME_HINT if transient else None) from None
    finally:
        if quiet:
            enable_progress_bars()
    wrong = [f for f in files if remote.get(f) != (folder / f).stat().st_size]
    if wrong:
        raise HubError(f"push to {repo_id} did not complete: the Hub lists {len(wrong)} file(s) missing or with "
                       f"another size ({wrong[0]}, ...)", RESUME_HINT)
    url = f"{endpoint}/{repo_id}" + ("" if landed == "main" else f"/tree/{landed}")
    return PushResult(repo_id, url, landed, commit_url, pr_url, files, size)
