"""The bundled model's routed experts run on transformers' experts implementations (eager, grouped_mm,
batched_mm) with the same logits, and its checkpoints keep the per-expert key layout on disk."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, make_dense
from safetensors import safe_open

from upcycle.convert import convert

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
CASES = {  # gated without biases; non-gated with biases (Conv1D); gated with biases and a shared expert
    "llama": ("llama", {}, {}),
    "gpt2": ("gpt2", {}, {}),
    "shared": ("llama", {"attention_bias": True, "mlp_bias": True},
               {"method": "split", "granularity": 2, "shared_experts": 1, "top_k": 2}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def bundled(request, tmp_path_factory):
    family, dense_overrides, recipe = CASES[request.param]
    root = tmp_path_factory.mktemp(f"experts-{request.param}")
    dense = make_dense(family, root / "dense", **dense_overrides)
    out = root / "moe"
    convert(dense, out, **{"target": "upcycle", "num_experts": 4, "top_k": 2, "router_std": 0.5, "quiet": True,
                           "verify": False, **recipe})
    return out


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def test_every_implementation_gives_the_same_logits(bundled):
    model = _load(bundled)
    # without a GPU the bundled model defaults to its grouped loop; with one, to transformers' default
    assert model.config._experts_implementation == ("grouped_mm" if torch.cuda.is_available() else "eager")
    logits = {}
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        with torch.no_grad():
            logits[impl] = model(_ids()).logits
    for impl in IMPLEMENTATIONS[1:]:
        assert (logits[impl] - logits["eager"]).abs().max() <= 1e-5, impl
    chosen = _load(bundled, experts_implementation="batched_mm")  # chosen at load time, as for native MoEs
    assert chosen.config._experts_implementation == "batched_mm"
    with torch.no_grad():
        assert (chosen(_ids()).logits - logits["eager"]).abs().max() <= 1e-5


def test_experts_are_fused_in_memory_and_per_expert_on_disk(bundled, tmp_path):
    model = _load(bundled)
    fused = {n for n, _ in model.named_parameters() if ".experts." in n and "shared" not in n}
    assert fused and all(n.split(".experts.")[1] in {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias",
                                                     "up_proj_bias", "down_proj_bias"} for n in fused)
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(str(bundled / "model.safetensors"), "pt") as before, \
            safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as after:
        assert set(before.keys()) == set(after.keys())
        assert any(".experts.3." in k for k in after.keys())
        for key in before.keys():
            assert before.get_tensor(key).equal(after.get_tensor(key)), key


def test_model_built_from_config_saves_per_expert_keys(bundled, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bundled)
    model = AutoModelForCausalLM.from_config(config)
    std = config.text_config.initializer_range
    for block in model.moe_blocks:  # initialised (normal weights, zero biases), not left as torch.empty
        for name, param in block.experts.named_parameters():
            param = param.detach()
            if name.endswith("_bias"):
                assert torch.count_nonzero(param) == 0, name
            else:
                assert torch.isfinite(param).all() and 0.5 * std < float(param.std()) < 2 * std, name
    model.save_pretrained(tmp_path / "fresh")
    with safe_open(str(tmp_path / "fresh" / "model.safetensors"), "pt") as fresh, \
            safe_open(str(bundled / "model.safetensors"), "pt") as converted:
        assert set(fresh.keys()) == set(converted.keys())


def test_expert_view_shares_the_fused_storage(bundled):
    model = _load(bundled)
    experts = model.moe_blocks[0].experts
    first = experts[0]
    x = torch.randn(3, model.config.text_config.hidden_size)
    with torch.no_grad():
        ids = torch.zeros(3, 1, dtype=torch.long)
        assert torch.allclose(first(x), experts.eager_forward(x, ids, torch.ones(3, 1)), atol=1e-6)
        experts[1].load_state_dict(first.state_dict())
        assert torch.allclose(experts[1](x), first(x))
    assert len(experts) == 4 and len(experts[1:]) == 3
