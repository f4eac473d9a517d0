"""Training data: text files, JSONL (``text`` or pre-tokenised ``input_ids``) or a folder of them
(read by :mod:`upcycle.textdata`), tokenised and packed into fixed-length sequences."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import DataError
from ..textdata import read_documents


def tokenise(path: str | Path, tokenizer: Any, eos_token_id: Optional[int]) -> list[int]:
    """All documents under ``path`` as one token stream, each document followed by EOS."""
    stream: list[int] = []
    for doc in read_documents(path, "data", token_ids=True):
        if isinstance(doc, str):
            if tokenizer is None:
                raise DataError(f"{path}: holds text but the model folder has no tokenizer; add one or "
                                "pre-tokenise the data as JSONL 'input_ids'")
            ids = tokenizer(doc)["input_ids"]
        else:
            ids = doc
        if not ids:
            continue
        stream.extend(ids)
        if eos_token_id is not None and ids[-1] != eos_token_id:
            stream.append(eos_token_id)
    if not stream:
        raise DataError(f"{path}: the data is empty (no text and no token ids)")
    return stream


class PackedDataset:
    """Fixed-length blocks cut from one token stream; labels are the inputs (the model shifts them).

    The tail shorter than ``seq_len`` is dropped. Documents share blocks, separated by EOS.
    """

    def __init__(self, stream: list[int], seq_len: int, source: str = "data"):
        import torch

        blocks = len(stream) // seq_len
        if blocks == 0:
            raise DataError(f"{source}: only {len(stream)} tokens, fewer than one sequence of --seq-len "
                            f"{seq_len}; add data or lower --seq-len")
        self.seq_len = seq_len
        self.blocks = torch.tensor(stream[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def vocab_check(dataset: PackedDataset, vocab_size: int, source: str) -> None:
    """Refuse token ids the model's embedding cannot look up."""
    if not vocab_size:
        return
    top = int(dataset.blocks.max())
    if top >= vocab_size or int(dataset.blocks.min()) < 0:
        raise DataError(f"{source}: token id {top} is outside the model's vocabulary (size {vocab_size}); "
                        "pre-tokenise with the model's tokenizer")


def load_packed(path: str | Path, tokenizer: Any, seq_len: int, eos_token_id: Optional[int],
                vocab_size: Optional[int] = None) -> PackedDataset:
    """Read, tokenise and pack ``path`` into ``seq_len`` blocks."""
    dataset = PackedDataset(tokenise(path, tokenizer, eos_token_id), seq_len, str(path))
    vocab_check(dataset, vocab_size, str(path))
    return dataset
