"""The tensor toolkit below planning and targets: what an expert is, and how each output tensor is made.

* :class:`ExpertSlice` / :class:`LayerExperts`: an expert as a view of the dense FFN, and one layer's experts.
* :class:`SourceCache`: the few most recent dense tensors, so every expert copy or slice reads its matrix once.
* :class:`OutTensor`: one planned output tensor (its spec and a ``make(cache)`` function).
* :func:`expert_matrix`: THE maker of expert tensors; it always reads through ``family.ffn_matrix`` (fused
  tensors split, Conv1D transposed), handles biases, neuron slices, Drop-Upcycling redraws, noise and the
  down-projection scale. :func:`expert_tensor` and :func:`packed_tensor` wrap it into output tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .families import PROJECTIONS, DenseFamily
from .families.base import SourceView
from .io.safetensors_format import TensorSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: separates a source name from a dense key when one output reads several models (``upcycle merge``)
SOURCE_SEPARATOR = "::"


@dataclass(frozen=True)
class ExpertSlice:
    """One expert as a view of the dense FFN: which neurons it keeps and how its down projection is scaled.

    ``neurons`` of None means every neuron in the dense order. ``reinit`` lists positions (within the
    expert) whose gate/up rows and down column are redrawn from the dense matrices' mean and std;
    ``noise_std`` adds Gaussian noise; both draw from a generator seeded with ``seed``. ``source`` names
    the model whose FFN the expert reads (keys ``"<source>::<dense key>"``); None is the one dense source.
    """

    neurons: Optional[torch.Tensor] = None
    down_scale: float = 1.0
    reinit: Optional[torch.Tensor] = None
    noise_std: float = 0.0
    seed: int = 0
    source: Optional[str] = None

    @property
    def is_copy(self) -> bool:
        """True when the expert is the dense matrix unchanged."""
        return self.neurons is None and self.down_scale == 1.0 and self.reinit is None and not self.noise_std

    def width(self, dense_size: int) -> int:
        return dense_size if self.neurons is None else int(self.neurons.numel())

    def key(self, dense_key: str) -> str:
        """The reader key of a dense tensor for this expert's source."""
        return dense_key if self.source is None else f"{self.source}{SOURCE_SEPARATOR}{dense_key}"


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one MoE layer, plus the virtual group of each (experts of one group share a router row)."""

    experts: list[ExpertSlice]
    groups: list[int]
    shared: Optional[ExpertSlice] = None
    exact: bool = True


class SourceCache:
    """Holds the few most recent dense tensors (and their casts), so that every expert copy or slice
    reads its dense matrix once. Outputs built from several dense tensors (packed experts) fit in it.
    ``views`` (from :meth:`DenseFamily.present`) serve canonical names as slices of fused tensors."""

    def __init__(self, read: Callable[[str], torch.Tensor], size: int = 3,
                 views: Optional[dict[str, SourceView]] = None):
        self._read = read
        self._size = size
        self._views = views or {}
        self._entries: dict[str, dict[torch.dtype, torch.Tensor]] = {}
        self._raw_dtype: dict[str, torch.dtype] = {}

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        view = self._view(key)
        if view is not None:
            name, part = view
            return part.read(self.get(name, dtype))
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recent last
        else:
            while len(self._entries) >= self._size:
                oldest = next(iter(self._entries))
                del self._entries[oldest], self._raw_dtype[oldest]
            raw = self._read(key)
            self._entries[key], self._raw_dtype[key] = {raw.dtype: raw}, raw.dtype
        versions = self._entries[key]
        dtype = dtype or self._raw_dtype[key]
        if dtype not in versions:
            versions[dtype] = versions[self._raw_dtype[key]].to(dtype)
        return versions[dtype]

    def _view(self, key: str) -> Optional[tuple[str, SourceView]]:
        """The fused tensor (under the same source prefix) that serves ``key``, if any."""
        prefix, sep, bare = key.rpartition(SOURCE_SEPARATOR)
        view = self._views.get(bare)
        return None if view is None else (prefix + sep + view.fused, view)


@dataclass
class OutTensor:
    """One output tensor: its spec and how to make it from the source cache."""

    spec: TensorSpec
    make: Callable[[SourceCache], torch.Tensor]
    expert_of: Optional[int] = None  # layer index when the tensor belongs to a routed expert
    #: dense tensor whose values this repeats unchanged; written from its stored bytes when the dtypes match
    copy_of: Optional[str] = None


def layer_generator(seed: int, layer: int, stream: int) -> torch.Generator:
    """Independent, reproducible random stream per (seed, layer, purpose)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 17 + stream)


def redraw(tensor: torch.Tensor, dense: torch.Tensor, dim: int, sl: ExpertSlice, stream: int) -> torch.Tensor:
    """Drop-Upcycling re-initialisation (from the dense matrix's mean/std) and Gaussian noise."""
    gen = torch.Generator().manual_seed((sl.seed + stream) % 2**63)
    tensor = tensor.clone()
    if sl.reinit is not None and sl.reinit.numel():
        shape = list(tensor.shape)
        shape[dim] = sl.reinit.numel()
        fresh = torch.randn(shape, generator=gen) * dense.std() + dense.mean()
        tensor.index_copy_(dim, sl.reinit, fresh)
    if sl.noise_std:
        tensor += torch.randn(tensor.shape, generator=gen) * sl.noise_std
    return tensor


def expert_shape(hidden: int, proj: str, width: int, kind: str = "weight") -> tuple[int, ...]:
    """An expert tensor's shape in nn.Linear orientation (gate/up ``[F, H]``, down ``[H, F]``) or its bias."""
    if kind == "bias":
        return (hidden,) if proj == "down" else (width,)
    return (hidden, width) if proj == "down" else (width, hidden)


def expert_matrix(family: DenseFamily, layer: int, proj: str, sl: ExpertSlice, dtype: torch.dtype,
                  kind: str = "weight") -> Callable[[SourceCache], torch.Tensor]:
    """Make one expert's ``proj`` weight (nn.Linear orientation) or bias from the dense FFN: its neurons,
    Drop-Upcycling/noise redraws and the down scale. Biases are sliced, never redrawn or scaled; the
    down-projection bias is the dense one whole."""
    is_weight = kind == "weight"

    def make(cache: SourceCache) -> torch.Tensor:
        if sl.is_copy:
            return family.ffn_matrix(lambda key: cache.get(sl.key(key), dtype), layer, proj, kind).contiguous()
        dense = family.ffn_matrix(lambda key: cache.get(sl.key(key), torch.float32), layer, proj, kind)
        dim = 1 if proj == "down" and is_weight else 0
        keep_all = sl.neurons is None or (proj == "down" and not is_weight)
        tensor = dense if keep_all else dense.index_select(dim, sl.neurons)
        if is_weight and (sl.reinit is not None or sl.noise_std):
            tensor = redraw(tensor, dense, dim, sl, PROJECTIONS.index(proj))
        if proj == "down" and is_weight and sl.down_scale != 1.0:
            tensor = tensor * sl.down_scale
        return tensor.to(dtype).contiguous()

    return make


def expert_tensor(name: str, family: DenseFamily, layer: int, proj: str, sl: ExpertSlice, dtype: torch.dtype,
                  hidden: int, dense_size: int, *, kind: str = "weight", zero: bool = False,
                  expert_of: Optional[int] = None) -> OutTensor:
    """An output tensor holding slice ``sl`` of the dense ``proj`` weight (or bias) of ``layer``. An unchanged
    copy of a weight stored in nn.Linear orientation may be written from the source's stored bytes;
    ``zero`` gives the same shape filled with zeros."""
    shape = expert_shape(hidden, proj, sl.width(dense_size), kind)
    if zero:
        return OutTensor(TensorSpec(name, shape, dtype), lambda cache: torch.zeros(shape, dtype=dtype), expert_of)
    key = family.mlp_key(layer, proj, kind)
    stored_as_is = sl.is_copy and family.mlp_layout == "linear"
    return OutTensor(TensorSpec(name, shape, dtype), expert_matrix(family, layer, proj, sl, dtype, kind),
                     expert_of=expert_of, copy_of=sl.key(key) if stored_as_is else None)


def packed_tensor(name: str, family: DenseFamily, layer: int, projs: Sequence[str], slices: Sequence[ExpertSlice],
                  dtype: torch.dtype, hidden: int, dense_size: int, *, zero_down: bool = False,
                  stacked: bool = True, expert_of: Optional[int] = None) -> OutTensor:
    """Several projections of several experts in one tensor: per expert the listed projections concatenated
    along rows (e.g. gate then up -> ``[2F, H]``), then the experts stacked (``[E, rows, cols]``) when
    ``stacked`` (one expert, unstacked, for a shared MLP). ``zero_down`` writes a zero down projection."""
    width = slices[0].width(dense_size)
    shapes = [expert_shape(hidden, proj, width) for proj in projs]
    rows_cols = (sum(s[0] for s in shapes), shapes[0][1])
    shape = (len(slices), *rows_cols) if stacked else rows_cols

    def part(proj: str, sl: ExpertSlice) -> Callable[[SourceCache], torch.Tensor]:
        if zero_down and proj == "down":
            return lambda cache: torch.zeros(expert_shape(hidden, proj, width), dtype=dtype)
        return expert_matrix(family, layer, proj, sl, dtype)

    makers = [[part(proj, sl) for proj in projs] for sl in slices]

    def make(cache: SourceCache) -> torch.Tensor:
        rows = [torch.cat([m(cache) for m in row], dim=0) for row in makers]
        return torch.stack(rows) if stacked else rows[0]

    return OutTensor(TensorSpec(name, shape, dtype), make, expert_of=expert_of)


def zeros_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> OutTensor:
    """A generated all-zero tensor."""
    return OutTensor(TensorSpec(name, tuple(shape), dtype), lambda cache: torch.zeros(shape, dtype=dtype))


def copied_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> OutTensor:
    """A dense tensor written unchanged (cast to ``dtype``)."""
    return OutTensor(TensorSpec(key, tuple(shape), dtype), lambda cache: cache.get(key, dtype), copy_of=key)


def generated_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                     make: Callable[[SourceCache], torch.Tensor], expert_of: Optional[int] = None) -> OutTensor:
    """A tensor computed by ``make`` (a router, say)."""
    return OutTensor(TensorSpec(name, tuple(shape), dtype), make, expert_of=expert_of)


__all__ = ["DTYPES", "ExpertSlice", "LayerExperts", "OutTensor", "SourceCache", "copied_tensor", "expert_matrix",
           "expert_shape", "expert_tensor", "generated_tensor", "layer_generator", "packed_tensor", "redraw",
           "zeros_tensor"]
