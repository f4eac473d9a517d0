"""Dense checkpoints from the Hugging Face Hub: only the files a conversion needs, cached, offline-capable.

Downloads go through ``huggingface_hub.snapshot_download`` into the usual cache, so
``HF_HUB_OFFLINE=1``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` behave as
everywhere else in the ecosystem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..errors import SourceNotFoundError
from .source import TOKENIZER_FILES

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
META_FILES = ["config.json", "generation_config.json", "README.md", *TOKENIZER_FILES]
WEIGHT_PATTERNS = (
    ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"],
    ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"],
)


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for patterns in WEIGHT_PATTERNS for name in patterns if "*" not in name)


def download(repo_id: str, revision: Optional[str] = None, quiet: bool = False) -> Path:
    """Fetch config, tokenizer and weights (safetensors if the repo has them, else .bin) and return the folder."""
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
        folder = None
        for weights in WEIGHT_PATTERNS:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=META_FILES + weights))
            if _has_weights(folder):
                return folder
        raise SourceNotFoundError(f"Hub repo {repo_id} has no transformers weights "
                                  "(model.safetensors, sharded safetensors or pytorch_model.bin)")
    except GatedRepoError:
        raise SourceNotFoundError(f"Hub repo {repo_id} is gated: accept its terms on the Hub and log in "
                                  "(HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise SourceNotFoundError(f"Hub repo {repo_id} not found (or private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise SourceNotFoundError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once online, or pass a local folder") from None
    except OSError as exc:
        raise SourceNotFoundError(f"{repo_id}: download failed ({exc})") from None
    finally:
        if quiet:
            enable_progress_bars()
