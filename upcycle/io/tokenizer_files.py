"""Tokenizer files written so that both transformers generations load them.

transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, a name transformers 4 (and tools
pinned to it, such as llama.cpp's ``convert_hf_to_gguf.py`` environment) does not know. Its
transformers 4 name is ``PreTrainedTokenizerFast``, which transformers 5 keeps as an alias of the same
class, so the rewritten file loads unchanged there.
"""

from __future__ import annotations

import json
from pathlib import Path

#: class names only transformers 5 knows -> the name both generations load from ``tokenizer.json``
PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_tokenizer_config_portable(folder: Path) -> bool:
    """Rewrite ``folder/tokenizer_config.json``'s ``tokenizer_class`` to a name both transformers 4 and 5
    know; True when it changed. Left alone without a ``tokenizer.json`` (the portable class reads it)."""
    config_file = Path(folder) / "tokenizer_config.json"
    if not config_file.is_file() or not (Path(folder) / "tokenizer.json").is_file():
        return False
    config = json.loads(config_file.read_text(encoding="utf-8"))
    portable = PORTABLE_CLASS.get(config.get("tokenizer_class"))
    if portable is None:
        return False
    config["tokenizer_class"] = portable
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True
