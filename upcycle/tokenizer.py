"""The one tokenizer loader (calibration, verify, train, routing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

PROBE_TEXT = "The capital of France is"

Location = Union[str, Path, Mapping[str, Any]]  # a folder or repo id, or ``from_pretrained`` keyword arguments


def load_tokenizer(*locations: Location) -> Optional[Any]:
    """The first usable tokenizer among ``locations``, else None.

    transformers 5 builds an empty tokenizer for a folder without tokenizer files (one token, no ids for
    any text); a tokenizer that fails to load, has fewer than two tokens or turns text into no ids is
    treated as missing.
    """
    from transformers import AutoTokenizer

    for location in locations:
        kwargs = dict(location) if isinstance(location, Mapping) else {"pretrained_model_name_or_path": str(location)}
        try:
            tokenizer = AutoTokenizer.from_pretrained(**kwargs)
            if len(tokenizer) >= 2 and tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
                return tokenizer
        except Exception:  # noqa: BLE001 - any failure means no usable tokenizer here
            continue
    return None
