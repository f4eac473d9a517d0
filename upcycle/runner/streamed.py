"""One model run a decoder layer at a time: the model's own code, its weights streamed from the checkpoint.

The skeleton is the real ``*ForCausalLM`` built from the config with its parameters on the meta device.
Three steps, each with the model's own forward code:

1. :meth:`StreamedModel.embed` runs the model's forward with every decoder layer's ``forward`` replaced by a
   recorder: it keeps the hidden states entering layer 0 and the arguments the model passes to each layer
   (attention masks, rotary embeddings, position ids: they depend on the tokens, never on the layers' output).
2. :meth:`StreamedModel.layer` reads one layer's tensors, and :meth:`run_layer` calls the real layer with the
   recorded arguments on every batch; leaving the ``with`` block frees the layer.
3. :meth:`StreamedModel.logits` runs the model's forward once more with identity layers, the last one
   handing back the final hidden states, so the final norm, LM head and logit scaling are the model's own.

Memory: the small modules outside the layers, one layer at a time (the cap refuses more), the input
embeddings only during step 1 and the output embeddings only during step 3, plus the activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..errors import SourceNotFoundError
from ..io.source import DenseSource
from ..modeling import register_model
from .device import LayerCapError, layer_cap
from .memory import limit_heap_growth
from .weights import CheckpointWeights, move_buffers, release


class _Stop(Exception):
    """Raised by the last recorder: step 1 needs nothing after the layers."""


@dataclass
class _Batch:
    """What the model passed to each layer for one batch of token ids."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # per layer: (args, kwargs) minus hidden states
    tuple_output: bool = False


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The ``*ForCausalLM`` of ``config`` with parameters on the meta device (buffers real, on CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    register_model()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers and its dotted path (``model.layers``, ``transformer.h``)."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and num_layers > 0]
    for name, mod in candidates:
        if type(mod[0]).__name__ in no_split:
            return name, mod
    if len(candidates) == 1:
        return candidates[0]
    raise SourceNotFoundError(f"cannot find the decoder layers of {type(model).__name__}")


def _num_layers(config: Any) -> int:
    text = getattr(config, "text_config", None) if getattr(config, "model_type", "") == "upcycle_moe" else None
    cfg = text or config
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer"))


def _key_mapping(model: nn.Module) -> Optional[dict[str, str]]:
    """The key renames ``from_pretrained`` passes for the bundled model (the dense family's)."""
    if getattr(model.config, "model_type", "") != "upcycle_moe":
        return None
    from ..modeling.modeling_upcycle_moe import dense_key_renames  # transformers' modeling stack, for upcycle_moe only

    return dense_key_renames(model.config.text_config.model_type) or None


class StreamedModel:
    """A causal LM whose decoder layers are read, run and freed one at a time.

    ``source`` reads the checkpoint (any dense source, or an MoE output folder via ``open_folder``);
    ``weights_dtype`` rounds every tensor first (the storage precision of the model compared against);
    ``max_layers`` (or ``UPCYCLE_MAX_RESIDENT_LAYERS``) is the most layers held at once; ``on_load(layer)``
    may edit each decoder layer once its weights are in (``verify --force-expert``).
    """

    def __init__(self, source: DenseSource, *, device: torch.device, dtype: torch.dtype,
                 weights_dtype: Optional[torch.dtype] = None, max_layers: Optional[int] = None,
                 config: Any = None, on_load: Optional[Callable[[nn.Module], None]] = None):
        limit_heap_growth()
        self.source = source
        self.device, self.dtype = device, dtype
        self.config = config if config is not None else source.load_config()
        self.max_layers = layer_cap(max_layers)
        self.on_load = on_load
        self.model = build_skeleton(self.config, dtype)
        self.num_layers = _num_layers(self.config)
        self.layers_path, self.layers = decoder_layers(self.model, self.num_layers)
        self.weights = CheckpointWeights(self.model, source, device=device, dtype=dtype,
                                         weights_dtype=weights_dtype, key_mapping=_key_mapping(self.model))
        self.resident: set[int] = set()
        self.peak_resident = 0
        inputs, outputs = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        self._input_prefix = names[id(inputs)] + "."
        self._output_prefix = names[id(outputs)] + "." if outputs is not None else None
        self._batches: list[_Batch] = []
        self._load_rest()

    # -- the modules outside the decoder layers ------------------------------------------------------------

    def _layer_prefixes(self) -> list[str]:
        return [f"{self.layers_path}.{i}." for i in range(self.num_layers)]

    def _outside_keys(self) -> list[str]:
        inside = set(self.weights.keys_under(self._layer_prefixes()))
        return [k for k in self.weights.target if k not in inside]

    def _load_rest(self) -> None:
        """Norms, position embeddings and other small modules outside the layers (not the LM head)."""
        skip = (self._input_prefix,) + ((self._output_prefix,) if self._output_prefix else ())
        keys = [k for k in self._outside_keys() if not self.weights.target[k].startswith(skip)]
        self.weights.load(keys)
        move_buffers(self.model, self.device)

    def _load_module(self, prefix: str) -> None:
        keys = [k for k in self._outside_keys() if self.weights.target[k].startswith(prefix)]
        self.weights.load(keys)

    def _load_output_embeddings(self) -> None:
        """The LM head; when tied and absent from the checkpoint, the input embeddings' tensor."""
        self._load_module(self._output_prefix)
        tied = getattr(self.model, "_tied_weights_keys", None) or {}
        for name, param in self.model.get_output_embeddings().named_parameters(prefix=self._output_prefix[:-1]):
            if param.device.type != "meta":
                continue
            source_name = tied.get(name) if isinstance(tied, dict) else None
            key = next((k for k, t in self.weights.target.items() if t == source_name), None)
            if key is None:
                raise SourceNotFoundError(f"{self.source.spec}: the checkpoint has no tensor for {name}")
            self.weights.assign(name, key)

    # -- step 1: embeddings and the arguments of every layer -----------------------------------------------

    def embed(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states entering layer 0 for each batch of token ids ``[B, T]``; records each layer's arguments."""
        self._load_module(self._input_prefix)
        self._batches = []
        hidden = []
        try:
            for ids in batches:
                batch, first = _Batch(), []

                def record(index: int, batch=batch, first=first) -> Callable:
                    def forward(*args, **kwargs):
                        h, rest, kw = _split_hidden(args, kwargs)
                        if index == 0:
                            first.append(h)
                        batch.calls.append((rest, kw))
                        if index == self.num_layers - 1:
                            raise _Stop
                        return h
                    return forward

                with self._patched(record), torch.no_grad(), contextlib.suppress(_Stop):
                    self.model(input_ids=ids.to(self.device), use_cache=False)
                self._batches.append(batch)
                hidden.append(first[0])
        finally:
            if not self._output_tied_to_input():
                release(self.model.get_input_embeddings())
        return hidden

    def _output_tied_to_input(self) -> bool:
        out = self.model.get_output_embeddings()
        return out is not None and out.weight is self.model.get_input_embeddings().weight

    # -- step 2: one layer at a time -----------------------------------------------------------------------

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` with its weights loaded; freed when the block ends."""
        if self.max_layers is not None and len(self.resident) + 1 > self.max_layers:
            raise LayerCapError(f"holding layer {index} would make {len(self.resident) + 1} resident layers; "
                                f"the cap is {self.max_layers}")
        module = self.layers[index]
        self.weights.load(self.weights.keys_under([f"{self.layers_path}.{index}."]))
        if index + 1 < self.num_layers:  # the next layer's bytes come off the disk while this one runs
            self.weights.prefetch(self.weights.keys_under([f"{self.layers_path}.{index + 1}."]))
        move_buffers(module, self.device)
        if self.on_load is not None:
            self.on_load(module)
        self.resident.add(index)
        self.peak_resident = max(self.peak_resident, len(self.resident))
        try:
            yield module
        finally:
            release(module)
            self.resident.discard(index)

    def run_layer(self, module: nn.Module, index: int, hidden: list[torch.Tensor], batch: int = 0
                  ) -> list[torch.Tensor]:
        """``module`` (layer ``index``, from :meth:`layer`) on the hidden states of the embedded batches
        ``batch, batch + 1, ...`` (all of them by default)."""
        out = []
        with torch.no_grad():
            for h, batch in zip(hidden, self._batches[batch:]):
                args, kwargs = batch.calls[index]
                result = module(h, *args, **kwargs)
                batch.tuple_output = isinstance(result, tuple)
                out.append(result[0] if batch.tuple_output else result)
        return out

    # -- step 3: final norm and LM head --------------------------------------------------------------------

    def logits(self, hidden: list[torch.Tensor], keep: Optional[Callable[[torch.Tensor], Any]] = None) -> list[Any]:
        """The model's logits ``[B, T, V]`` (float32, on CPU) from the last layer's hidden states.

        ``keep`` maps each batch's logits to what is kept (e.g. a reduction), so only one batch's logits
        live at a time.
        """
        self._load_output_embeddings()
        out = []
        try:
            for h, batch in zip(hidden, self._batches):
                def replay(index: int, h=h, batch=batch) -> Callable:
                    def forward(*args, **kwargs):
                        passed, _, _ = _split_hidden(args, kwargs)
                        result = h if index == self.num_layers - 1 else passed
                        return (result,) if batch.tuple_output else result
                    return forward

                zeros = torch.zeros(*h.shape, dtype=h.dtype, device=self.device)
                with self._patched(replay), torch.no_grad():
                    logits = self.model(inputs_embeds=zeros, use_cache=False).logits.float()
                out.append(keep(logits) if keep is not None else logits.cpu())
        finally:
            release(self.model.get_output_embeddings())
        return out

    # -- helpers -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _patched(self, make: Callable[[int], Callable]) -> Iterator[None]:
        """Every decoder layer's ``forward`` replaced by ``make(index)`` (instance attribute), restored after."""
        for index, module in enumerate(self.layers):
            module.forward = make(index)
        try:
            yield
        finally:
            for module in self.layers:
                del module.forward


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The hidden states a layer is called with, and the other arguments."""
    if args:
        return args[0], args[1:], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs
