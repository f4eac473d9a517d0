"""The pieces of ``verify`` that decide or print the verdict, each against hand-made inputs (no model runs):
the verdict text, the layer tolerance, split-group counting, the recipe's exactness claims, forced-expert
checks and copies, the stored dtype, prompts."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from upcycle.checkpoint import EXPERT_COUNT_KEYS
from upcycle.errors import DataError, RecipeError

v = importlib.import_module("upcycle.verify")  # the module (``upcycle.verify`` is also the function)


def report(**kw) -> v.VerifyReport:
    base = dict(max_abs_logit_diff=2e-6, mean_kl=1e-9, greedy_match=1.0, greedy_token_agreement=1.0,
                exact_expected=True, passed=True, atol=1e-3, dtype="float32", weights_dtype="float32",
                num_prompts=5, max_new_tokens=16)
    return v.VerifyReport(**{**base, **kw})


def test_verdicts():
    assert report().finite and report().comparison == "greedy generation" and report().device == "cpu"
    assert report().first_broken_layer is None and report().split_selections is None
    assert v.report_text(report()).startswith("PASS (exact)\n")
    assert v.report_text(report(passed=False)).startswith("FAIL: exact recipe but logits differ\n")
    assert v.report_text(report(exact_expected=False)).startswith("measured (recipe is not exact by design)\n")
    assert v.report_text(report(finite=False, passed=False)).startswith("FAIL: non-finite values (NaN or inf)")
    assert v.report_text(report(finite=False, passed=False, exact_expected=False)).startswith("FAIL: non-finite")


def test_first_broken_layer_is_named_unless_the_exact_check_passed():
    named = "; hidden states first differ after layer 2\n"
    assert named in v.report_text(report(passed=False, first_broken_layer=2))
    assert named in v.report_text(report(exact_expected=False, first_broken_layer=2))
    assert "first differ" not in v.report_text(report(first_broken_layer=2))  # passed: within the tolerance
    assert "first differ" not in v.report_text(report(passed=False))
    assert "after layer 0" in v.report_text(report(passed=False, first_broken_layer=0))
    assert v.report_text(report(passed=False, first_broken_layer=2)).startswith(
        "FAIL: exact recipe but logits differ; hidden states first differ after layer 2\n")


def test_report_lines():
    text = v.report_text(report(max_abs_logit_diff=0.0123, mean_kl=4.5e-7, greedy_match=0.8,
                                greedy_token_agreement=0.95, device="cuda:0", dtype="bfloat16", atol=0.5))
    assert "\n  max |Δlogit|: 0.0123 (atol 0.5, bfloat16, cuda:0)\n  mean KL: 4.5e-07\n" in text
    assert text.endswith("  greedy: 80% of 5 prompts identical over 16 tokens (95% of tokens)")
    forced = v.report_text(report(comparison="teacher-forced next tokens", greedy_token_agreement=0.75,
                                  max_new_tokens=0))
    assert forced.endswith("  teacher-forced next tokens: 75% agree over 5 prompts (models too large to generate "
                           "in the memory budget)")


def test_worst_layer_is_the_non_finite_one_else_the_largest_difference():
    layers = [{"layer": 0, "max_abs_diff": 0.5, "finite": True}, {"layer": 1, "max_abs_diff": 0.25, "finite": True},
              {"layer": 2, "max_abs_diff": 0.125, "finite": True}]
    assert "\n  per layer: largest |Δhidden| 0.5 after layer 0 of 3" in v.report_text(report(per_layer=layers))
    layers[2] = {"layer": 2, "max_abs_diff": float("nan"), "finite": False}
    assert "largest |Δhidden| nan after layer 2 of 3" in v.report_text(report(per_layer=layers))
    assert "per layer" not in v.report_text(report())


def test_split_selection_line_only_when_some_split():
    text = v.report_text(report(split_selections=7, router_selections=168, dtype="bfloat16"))
    assert text.endswith("\n  router: 7 of 168 selections split a virtual group (router logits of different "
                         "groups tie in bfloat16; see docs/methods.md)")
    assert "router:" not in v.report_text(report(split_selections=0, router_selections=168))
    layers = [{"layer": 0, "max_abs_diff": 0.5, "finite": True}]
    both = v.report_text(report(per_layer=layers, split_selections=7, router_selections=168))
    assert "\n  per layer: largest |Δhidden| 0.5 after layer 0 of 1\n  router: 7 of 168" in both


def test_to_dict_has_every_field():
    d = report(per_layer=[{"layer": 0}]).to_dict()
    assert d["passed"] is True and d["per_layer"] == [{"layer": 0}] and d["max_abs_logit_diff"] == 2e-6
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("atol,scale,expected", [(1e-3, 0.25, 1e-3), (1e-3, 1.0, 1e-3), (1e-3, 40.0, 4e-2),
                                                  (0.5, torch.tensor(8.0), 4.0)])
def test_layer_tolerance_is_relative_above_one(atol, scale, expected):
    assert v._layer_tolerance(atol, scale) == pytest.approx(expected, rel=1e-12)


def test_split_selections():
    logits = torch.tensor([[3.0, 3.0, 2.0, 2.0, 1.0, 1.0],    # groups of 2, top-4: groups 0 and 1 whole
                           [3.0, 3.0, 2.0, 0.5, 1.0, 1.0],    # expert 2 without 3: split
                           [0.0, 0.0, 1.0, 1.0, 5.0, 5.0]])   # groups 2 and 1 whole
    assert v.split_selections(logits, 4, 2) == (1, 3)
    assert v.split_selections(logits.reshape(1, 3, 6), 4, 2) == (1, 3)     # [B, T, E] is flattened
    assert v.split_selections(logits, 2, 2) == (0, 3)                       # top-2: groups 0, 0 and 2 whole
    # groups of 3 over 6 experts, top-3: the second row picks 0, 1 and 4 (two groups cut)
    assert v.split_selections(torch.tensor([[3.0, 3.0, 3.0, 0.0, 0.0, 0.0],
                                            [3.0, 2.9, 0.0, 0.0, 2.95, 0.0]]), 3, 3) == (1, 2)
    # picked by the softmax of the logits in fp32: bf16 logits that tie pick the lower index, as torch does
    assert v.split_selections(torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16), 2, 2) == (0, 1)


def _recipe(folder, recipe):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "upcycle_recipe.json").write_text(json.dumps(recipe))
    return folder


def test_split_groups_from_the_recipe(tmp_path):
    split = {"method": "split", "num_experts": 8, "top_k": 4}
    assert v._split_groups(_recipe(tmp_path / "a", {**split, "granularity": 2})) == (8, 4, 2)
    assert v._split_groups(_recipe(tmp_path / "b", {**split, "granularity": 4, "shared_experts": 1})) == (8, 4, 3)
    assert v._split_groups(_recipe(tmp_path / "c", {**split, "granularity": 2, "shared_experts": 1})) is None
    assert v._split_groups(_recipe(tmp_path / "d", split)) is None                 # granularity 1
    assert v._split_groups(_recipe(tmp_path / "e", {**split, "granularity": 2, "method": "replicate"})) is None
    (tmp_path / "f").mkdir()
    assert v._split_groups(tmp_path / "f") is None                                  # no recipe file


def test_exactness_claims(tmp_path):
    assert v._claims_exact(_recipe(tmp_path / "a", {"upcycle": {"exact": True}})) is True
    assert v._claims_exact(_recipe(tmp_path / "b", {"upcycle": {"exact": False}})) is False
    assert v._claims_exact(_recipe(tmp_path / "c", {"exact": True})) is False      # only the provenance counts
    (tmp_path / "d").mkdir()
    assert v._claims_exact(tmp_path / "d") is False
    merged = _recipe(tmp_path / "m", {"upcycle": {"exact": False, "merge": {"forced_exact": [True, False, True]}}})
    assert [v._claims_forced_exact(merged, e) for e in (-1, 0, 1, 2, 3)] == [False, True, False, True, False]
    assert v._claims_forced_exact(_recipe(tmp_path / "n", {"upcycle": {"merge": {}}}), 0) is False
    assert v._claims_forced_exact(tmp_path / "d", 0) is False


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("key", EXPERT_COUNT_KEYS)  # the checkpoint format's one list, every key of it
def test_forced_expert_count(key):
    assert v.forced_expert_count(_Config(**{key: 4}), 3) == 4
    assert v.forced_expert_count(_Config(**{key: 4}), 0) == 4
    for bad in (4, -1):
        with pytest.raises(RecipeError, match=f"--force-expert {bad}: the MoE has 4 experts"):
            v.forced_expert_count(_Config(**{key: 4}), bad)


def test_forced_expert_count_reads_the_text_config_and_needs_renormalised_weights():
    text = _Config(num_experts=6, norm_topk_prob=True)
    outer = _Config(get_text_config=lambda: text)
    assert v.forced_expert_count(outer, 5) == 6
    with pytest.raises(RecipeError, match="the MoE has no experts"):
        v.forced_expert_count(_Config(hidden_size=4), 0)
    with pytest.raises(RecipeError, match=r"^--force-expert needs renormalised top-k weights \(norm_topk_prob=true\)$"):
        v.forced_expert_count(_Config(num_experts=6, norm_topk_prob=False), 1)
    assert v.forced_expert_count(_Config(num_experts=6, norm_topk_prob=None), 1) == 6  # only False refuses
    # the count may sit on the outer config only (multimodal wrappers)
    assert v.forced_expert_count(_Config(get_text_config=lambda: _Config(hidden_size=4), n_routed_experts=5), 4) == 5
    # the first key present wins; a zero count is absent
    assert v.forced_expert_count(_Config(num_local_experts=0, num_experts=3), 2) == 3


def test_copy_expert_per_expert_modules_and_packed_tensors():
    import torch.nn as nn

    block = nn.Module()
    block.experts = nn.ModuleList(nn.Linear(3, 2) for _ in range(4))
    block.packed = nn.Parameter(torch.randn(4, 2, 3))           # fused [E, rows, cols]
    block.bias_of = nn.Module()
    block.bias_of.experts = nn.Module()
    block.bias_of.experts.bias = nn.Parameter(torch.randn(4, 2))  # an [E, ...] bias under experts.
    block.other = nn.Parameter(torch.randn(4, 2))                 # [4, 2] but not an expert tensor
    other = block.other.detach().clone()
    want = (block.experts[2].weight.detach().clone(), block.experts[2].bias.detach().clone(),
            block.packed[2].detach().clone(), block.bias_of.experts.bias[2].detach().clone())
    v.copy_expert(block, 2, 4)
    for e in range(4):
        assert torch.equal(block.experts[e].weight, want[0]) and torch.equal(block.experts[e].bias, want[1])
        assert torch.equal(block.packed[e], want[2]) and torch.equal(block.bias_of.experts.bias[e], want[3])
    assert torch.equal(block.other, other)


def test_copy_expert_keeps_the_path_before_experts():
    import torch.nn as nn

    model = nn.Module()
    model.a = nn.Module()
    model.b = nn.Module()
    model.a.experts = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(2))
    model.b.experts = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(2))
    wa, wb = model.a.experts[1].weight.detach().clone(), model.b.experts[1].weight.detach().clone()
    v.copy_expert(model, 1, 2)
    assert torch.equal(model.a.experts[0].weight, wa) and torch.equal(model.b.experts[0].weight, wb)


def test_stored_dtype(tmp_path):
    def folder(name, config):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        return path

    assert v._stored_dtype(folder("a", {"dtype": "bfloat16", "torch_dtype": "float16"}), "float32") == "bfloat16"
    assert v._stored_dtype(folder("b", {"torch_dtype": "float16"}), "float32") == "float16"
    assert v._stored_dtype(folder("c", {}), "bfloat16") == "bfloat16"
    assert v._stored_dtype(folder("d", {"dtype": "float8_e4m3fn"}), "float32") == "float32"


def test_model_bytes_counts_floating_tensors_in_the_compute_dtype():
    from pathlib import Path
    from types import SimpleNamespace

    from upcycle.io.safetensors_format import TensorInfo

    src = SimpleNamespace(infos={"w": TensorInfo(Path("x"), torch.bfloat16, (3, 5)),
                                 "ids": TensorInfo(Path("x"), torch.int64, (7,))})
    assert v._model_bytes(src, torch.float32) == 60 and v._model_bytes(src, torch.float16) == 30


def test_memory_budget_is_half_the_free_memory(monkeypatch):
    import upcycle.runner.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 1001)
    assert v.memory_budget(torch.device("cpu")) == 500
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert v.memory_budget(torch.device("cpu")) is None


def test_random_prompts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 7}))
    names, encoded, pad = v._random_prompts(tmp_path)
    assert [ids.shape for ids in encoded] == [(1, 5), (1, 11), (1, 17), (1, 23)] and pad is None
    assert names == ["<5 random token ids>", "<11 random token ids>", "<17 random token ids>", "<23 random token ids>"]
    assert all(int(ids.min()) >= 0 and int(ids.max()) < 7 for ids in encoded)
    assert len({int(i) for ids in encoded for i in ids.flatten()}) == 7     # the whole vocabulary is drawn
    assert all(torch.equal(a, b) for a, b in zip(encoded, v._random_prompts(tmp_path)[1]))  # fixed seed
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 5}}))
    assert max(int(ids.max()) for ids in v._random_prompts(tmp_path)[1]) == 4


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert v.read_prompts(tmp_path / "p.txt") == ["one", " two "]  # blank lines dropped, text kept as written
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        v.read_prompts(tmp_path / "e.txt")
    with pytest.raises(DataError, match=r"^prompts .*missing\.txt"):   # errors name what was being read
        v.read_prompts(tmp_path / "missing.txt")


def test_default_tolerances():
    assert v.DEFAULT_ATOL == {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.5}


def test_route_all_to_expert_makes_every_expert_that_one():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=3))
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3 and p.shape[0] == 3}
    assert len(packed) == 4   # gate_up and down of two layers
    v.route_all_to_expert(model, 2)
    for name, param in model.named_parameters():
        if name in packed:
            assert all(torch.equal(param[e], packed[name][2]) for e in range(3)), name
    with pytest.raises(RecipeError, match="the MoE has 3 experts"):
        v.route_all_to_expert(model, 3)
