"""Dense checkpoints from the Hugging Face Hub: only the files a conversion needs, cached, offline-capable.

Downloads go through ``huggingface_hub.snapshot_download`` into the usual cache, so
``HF_HUB_OFFLINE=1``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` behave as
everywhere else in the ecosystem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import CARD_FILE, CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TORCH_INDEX_FILE, TORCH_SINGLE_FILE
from ..errors import CorruptCheckpointError, SourceNotFoundError
from .safetensors_format import STR_TO_DTYPE, TensorInfo
from .source import TOKENIZER_FILES, DenseSource

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
META_FILES = [CONFIG_FILE, "generation_config.json", CARD_FILE, *TOKENIZER_FILES]
WEIGHT_PATTERNS = (
    [SINGLE_FILE, "model-*-of-*.safetensors", INDEX_FILE],
    [TORCH_SINGLE_FILE, "pytorch_model-*-of-*.bin", TORCH_INDEX_FILE],
)


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for patterns in WEIGHT_PATTERNS for name in patterns if "*" not in name)


def _snapshot(repo_id: str, revision: Optional[str], patterns: list[str], quiet: bool) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, with Hub errors turned into one clear line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if quiet:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise SourceNotFoundError(f"Hub repo {repo_id} is gated: accept its terms on the Hub and log in "
                                  "(HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(f"Hub repo {repo_id} not found (or private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{repo_id}{'@' + revision if revision else ''}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once online, or pass a local folder") from None
    except OSError as exc:
        raise SourceNotFoundError(f"{repo_id}: download failed ({exc})") from None
    finally:
        if quiet:
            enable_progress_bars()


def download(repo_id: str, revision: Optional[str] = None, quiet: bool = False) -> Path:
    """Fetch config, tokenizer and weights (safetensors if the repo has them, else .bin) and return the folder."""
    for weights in WEIGHT_PATTERNS:
        folder = _snapshot(repo_id, revision, META_FILES + weights, quiet)
        if _has_weights(folder):
            return folder
    raise SourceNotFoundError(f"Hub repo {repo_id} has no transformers weights "
                              "(model.safetensors, sharded safetensors or pytorch_model.bin)")


class HubHeadersSource(DenseSource):
    """Config, tokenizer files and safetensors headers of a Hub repo, without the weights (for ``--dry-run``).

    Headers come from ``huggingface_hub.get_safetensors_metadata`` (HTTP range requests).
    """

    def __init__(self, repo_id: str, revision: Optional[str], folder: Path, infos: dict[str, TensorInfo]):
        self.spec = self.repo_id = repo_id
        self.folder, self.commit, self._infos = folder, folder.name, infos

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        raise RuntimeError("internal error: a headers-only Hub source has no tensor data")

    def load_config(self) -> Any:
        from .config_check import load_checked_config

        return load_checked_config(self.folder, self.infos)


def open_headers(repo_id: str, revision: Optional[str] = None, quiet: bool = False) -> DenseSource:
    """A source that knows every tensor's shape and dtype without downloading weights.

    Offline, or for repos without safetensors, it falls back to the cached (or downloaded) checkpoint.
    """
    from huggingface_hub import HfApi, constants

    from .folder import open_folder

    folder = _snapshot(repo_id, revision, META_FILES, quiet)
    if not constants.HF_HUB_OFFLINE:
        try:
            # a fresh HfApi: the module-level get_safetensors_metadata keeps the endpoint of import time
            meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
        except Exception:  # noqa: BLE001 - no safetensors or no network: use the full path below
            meta = None
        if meta is not None:
            infos = {}
            for file_name, file_meta in meta.files_metadata.items():
                for name, t in file_meta.tensors.items():
                    if t.dtype not in STR_TO_DTYPE or not all(isinstance(d, int) and d >= 0 for d in t.shape):
                        raise CorruptCheckpointError(f"{repo_id}: {file_name}: tensor {name!r} has an unsupported "
                                                     f"dtype {t.dtype!r} or a malformed shape {t.shape!r}")
                    if name in infos:
                        raise CorruptCheckpointError(f"{repo_id}: tensor {name!r} is stored twice, in "
                                                     f"{infos[name].file.name} and {file_name}")
                    infos[name] = TensorInfo(folder / file_name, STR_TO_DTYPE[t.dtype], tuple(t.shape))
            return HubHeadersSource(repo_id, revision, folder, infos)
    source = open_folder(download(repo_id, revision, quiet), repo_id)
    source.repo_id, source.commit = repo_id, source.folder.name
    return source
