"""Tiny random dense models for the tests, one factory per family, each with its distinctive options on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

VOCAB = 96


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights are ones at init; random ones catch a norm that is dropped or misplaced."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("norm" in name or "ln_" in name) and param.dim() == 1 and not name.endswith(".bias"):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=generator))


def _base(**overrides: Any) -> dict[str, Any]:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.update(overrides)
    return cfg


def llama_config(**kw: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**_base(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **kw))


def mistral_config(**kw: Any):
    from transformers import MistralConfig

    return MistralConfig(**_base(sliding_window=4, head_dim=32, **kw))


def qwen2_config(**kw: Any):
    from transformers import Qwen2Config

    return Qwen2Config(**_base(tie_word_embeddings=True, **kw))


def qwen3_config(**kw: Any):
    from transformers import Qwen3Config

    return Qwen3Config(**_base(head_dim=24, **kw))


def olmo2_config(**kw: Any):
    from transformers import Olmo2Config

    return Olmo2Config(**_base(pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}, **kw))


def granite_config(**kw: Any):
    from transformers import GraniteConfig

    return GraniteConfig(**_base(tie_word_embeddings=True, embedding_multiplier=6.0, residual_multiplier=0.3,
                                 attention_multiplier=0.05, logits_scaling=4.0, initializer_range=0.1, **kw))


def phi3_config(**kw: Any):
    from transformers import Phi3Config

    return Phi3Config(**_base(pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4, **kw))


def ernie4_5_config(**kw: Any):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(**_base(head_dim=24, tie_word_embeddings=True, **kw))


def hunyuan_v1_dense_config(**kw: Any):
    from transformers import HunYuanDenseV1Config

    return HunYuanDenseV1Config(**_base(head_dim=24, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 4.0, "factor": 1.0}, **kw))


def cohere2_config(**kw: Any):
    from transformers import Cohere2Config

    return Cohere2Config(**_base(head_dim=24, logit_scale=0.5, sliding_window=4, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, layer_types=["sliding_attention", "full_attention",
                                                              "sliding_attention"], **kw))


CONFIGS: dict[str, Callable[..., Any]] = {
    "llama": llama_config,
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "olmo2": olmo2_config,
    "granite": granite_config,
    "phi3": phi3_config,
    "ernie4_5": ernie4_5_config,
    "hunyuan_v1_dense": hunyuan_v1_dense_config,
    "cohere2": cohere2_config,
}


def gemma_config(**kw: Any):
    from transformers import GemmaConfig

    return GemmaConfig(**_base(head_dim=16, **kw))


def gemma2_config(**kw: Any):
    from transformers import Gemma2Config

    return Gemma2Config(**_base(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                                attn_logit_softcapping=50.0, **kw))


def gemma3_text_config(**kw: Any):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_base(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention"], **kw))


def gpt2_config(**kw: Any):
    from transformers import GPT2Config

    return GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_inner=96, n_positions=256), **kw})


def gpt_neox_config(**kw: Any):
    from transformers import GPTNeoXConfig

    cfg = _base(partial_rotary_factor=0.25, use_parallel_residual=True, **kw)
    cfg.pop("num_key_value_heads")
    return GPTNeoXConfig(**cfg)


def phi_config(**kw: Any):
    from transformers import PhiConfig

    return PhiConfig(**_base(partial_rotary_factor=0.5, qk_layernorm=True, **kw))


def stablelm_config(**kw: Any):
    from transformers import StableLmConfig

    return StableLmConfig(**_base(use_qkv_bias=True, qk_layernorm=True, partial_rotary_factor=0.25, **kw))


def starcoder2_config(**kw: Any):
    from transformers import Starcoder2Config

    return Starcoder2Config(**_base(use_bias=True, sliding_window=4, **kw))


def olmo_config(**kw: Any):
    from transformers import OlmoConfig

    return OlmoConfig(**_base(clip_qkv=8.0, **kw))


CONFIGS.update({
    "gemma": gemma_config, "gemma2": gemma2_config, "gemma3_text": gemma3_text_config, "gpt2": gpt2_config,
    "gpt_neox": gpt_neox_config, "phi": phi_config, "stablelm": stablelm_config, "starcoder2": starcoder2_config,
    "olmo": olmo_config,
})


def _randomise_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Biases are zeros at init; random ones catch a bias that is dropped, scaled or duplicated."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_dense(family: str, folder: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Save a tiny random ``family`` model (fp32, random norm weights) to ``folder`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIGS[family](**config_overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    _randomise_biases(model, torch.Generator().manual_seed(seed + 2))
    model.save_pretrained(folder)
    return Path(folder)


def save_tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over ``VOCAB`` ids, saved in the transformers layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words = "the a of to and in is it that was for on are as with his they at be this from".split()
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def max_logit_diff(dense_dir: Path, moe_dir: Path, seq_len: int = 24, batch: int = 3) -> float:
    """Max |Δlogit| at fp32 between the dense model and the MoE on random token ids."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(123))
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float((dense(ids).logits - moe(ids).logits).abs().max())


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


#: Tolerance of the exactness tests at fp32 on the tiny models (3 layers, hidden 64, |logits| ~ 1-10):
#: 32 ulp of 1.0 in fp32 (32 x 1.19e-7). Measured (benchmarks/exactness_noise.py, docs/testing.md): the noise
#: of an exact conversion is at most 1.5e-6 on every family, and a 1e-3 relative error in one routed expert
#: moves the logits by more. The old 1e-4 passed such errors.
EXACT_ATOL = 32 * 2.0 ** -23

_EXPERT_DOWN = re.compile(r"\.layers?\.(\d+)\..*(experts\.(\d+)\.(down_proj|w2|fc2|c_proj)\.weight|output_linear\.weight)$")


def expert_down_keys(state: dict, layer: int = 0) -> dict[int, str]:
    """The down projection of each expert of MoE layer ``layer``: {expert: key}; a packed ``[E, ...]``
    tensor (GraniteMoE) gives {-1: key}."""
    found = {}
    for key in state:
        m = _EXPERT_DOWN.search(key.replace(".h.", ".layers."))
        if m and int(m.group(1)) == layer:
            found[int(m.group(3)) if m.group(3) is not None else -1] = key
    return found


def perturb_one_expert(moe_dir: Path, expert: int, rel: float = 1e-3, layer: int = 0) -> str:
    """Give the down projection of ``expert`` in MoE layer ``layer`` a relative error ``rel`` in place: each
    element times ``1 +- rel`` (random signs; in a packed ``[E, ...]`` tensor only that expert's slice);
    returns the key changed."""
    from safetensors.torch import load_file, save_file

    path = Path(moe_dir) / "model.safetensors"
    state = load_file(path)
    keys = expert_down_keys(state, layer)
    key = keys.get(expert, keys.get(-1))
    assert key is not None, f"no down projection of expert {expert} in layer {layer}: {sorted(state)}"
    tensor = state[key].clone()
    part = tensor[expert] if -1 in keys else tensor
    signs = torch.randint(0, 2, part.shape, generator=torch.Generator().manual_seed(expert)) * 2 - 1
    part.mul_(1 + rel * signs)  # a uniform scale would vanish behind gemma2/3's post-FFN norm
    state[key] = tensor
    save_file(state, path, metadata={"format": "pt"})
    return key


def tiny_dense(family: str, seed: int = 0, **config_overrides: Any):
    """A tiny random ``family`` model in memory (what :func:`make_dense` saves), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](**config_overrides)).eval()
    _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    _randomise_biases(model, torch.Generator().manual_seed(seed + 2))
    return model


def state_infos(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``TensorInfo`` of each tensor of a state dict, as a reader gives them (no file behind them)."""
    from upcycle.io.safetensors_format import TensorInfo

    return {k: TensorInfo(Path("in-memory"), t.dtype, tuple(t.shape)) for k, t in state.items()}


def convert_in_memory(dense, folder: Path, recipe=None, **overrides: Any):
    """Plan a conversion of the in-memory ``dense`` model, make every planned tensor from its state dict and
    load them into the target's class from ``folder`` (one safetensors file and the config, nothing else of
    the converter): ``(plan, moe model)``. A planned tensor the class does not expect, or one it misses
    (but the tied ``lm_head``), fails here."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from upcycle.convert import build_recipe
    from upcycle.plan import make_plan
    from upcycle.tensors import SourceCache

    state = {k: v.detach() for k, v in dense.state_dict().items()}
    plan = make_plan(dense.config, state_infos(state), build_recipe(recipe, **overrides))
    cache = SourceCache(state.__getitem__, views=plan.source_views)
    tensors = {}
    for t in plan.tensors:
        value = t.make(cache)
        assert tuple(value.shape) == tuple(t.spec.shape) and value.dtype == t.spec.dtype, t.spec
        assert t.spec.name not in tensors, t.spec.name
        tensors[t.spec.name] = value.clone()  # replicated experts share storage; safetensors refuses that
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan.target.build_config(plan).save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    moe, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    tied = {"lm_head.weight"} if plan.dense_config.get("tie_word_embeddings") else set()
    assert set(info["missing_keys"]) <= tied and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return plan, moe.eval()


def logit_diff(a, b, seq_len: int = 24, batch: int = 3) -> float:
    """Max |Δlogit| between two in-memory models on random token ids."""
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float((a(ids).logits.float() - b(ids).logits.float()).abs().max())


def cache_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """Lay out ``models--org--name`` the way huggingface_hub does (blobs + symlinked snapshots)."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for sha, folder in snapshots.items():
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        for file in folder.iterdir():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / file.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)
    return repo
