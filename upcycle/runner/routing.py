"""Router logits of a streamed MoE: which modules are routers, and lists that receive their logits."""

from __future__ import annotations

from typing import Any

from torch import nn


def router_modules(model: nn.Module, num_experts: int) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every router, in forward order.

    Native transformers MoE classes declare their router class for ``output_router_logits``; other models
    are searched for ``gate``/``router`` modules whose weight has one row per expert.
    """
    recorder = getattr(model, "_can_record_outputs", None) or {}
    recorded = recorder.get("router_logits")
    target = getattr(recorded, "target_class", recorded if isinstance(recorded, type) else None)
    found = []
    for name, module in model.named_modules():
        if target is not None:
            if isinstance(module, target):
                found.append((name, module))
            continue
        weight = getattr(module, "weight", None)
        if name.rsplit(".", 1)[-1] in ("gate", "router") and getattr(weight, "ndim", 0) == 2 \
                and weight.shape[0] == num_experts:
            found.append((name, module))
    return found


def router_logit_sinks(model: nn.Module, num_experts: int) -> list[tuple[str, list[Any]]]:
    """``(router name, list)`` per router (forward order); each list receives the router's logits per call.

    Native MoE classes: a forward hook on the router (its output, or the element ``output_router_logits``
    records). The bundled model computes its logits in the block (fp32) and hands them to
    ``router_logits_sink``; call this after :meth:`StreamedModel.embed`, whose forward resets those.
    """
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    index = getattr(recorder, "index", 0)
    modules = dict(model.named_modules())
    sinks: list[tuple[str, list[Any]]] = []
    for name, module in router_modules(model, num_experts):
        sink: list[Any] = []
        block = modules.get(name.rpartition(".")[0])
        if block is not None and hasattr(block, "router_logits_sink"):
            block.router_logits_sink = sink
        else:
            module.register_forward_hook(
                lambda mod, args, out, sink=sink: sink.append(out[index] if isinstance(out, tuple) else out))
        sinks.append((name, sink))
    return sinks
