"""``upcycle merge``: experts from tiny fine-tunes of one base, own and mergekit-moe configs, every router
init, the targets that can hold a merge, the exactness cases and bad configs (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from checks import assert_clean_error, run_cli
from factories import cache_repo, max_logit_diff, read_json
from merge_factories import PROMPTS, config, fine_tune, make_base
from safetensors.torch import load_file

import upcycle
from upcycle.errors import RecipeError, SourceNotFoundError, UnsupportedArchitectureError
from upcycle.merge import load_config


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A llama base, two FFN fine-tunes, one attention fine-tune and a byte-identical copy of the base."""
    root = tmp_path_factory.mktemp("merge")
    base = make_base("llama", root / "base")
    return {"root": root, "base": base, "a": fine_tune(base, root / "a", 1), "b": fine_tune(base, root / "b", 2),
            "attn": fine_tune(base, root / "attn", 3, part="self_attn"),
            "copy": fine_tune(base, root / "copy", 4, scale=0.0)}


def _merge(cfg: dict, out: Path, **kw):
    return upcycle.merge(cfg, out, quiet=True, **kw)


def _forced(result) -> dict[int, dict]:
    return {row["expert"]: row for row in result.verification["sources"]}


def test_ffn_fine_tunes_are_reproduced_per_expert(llama, tmp_path):
    result = _merge(config(llama["base"], [llama["a"], llama["b"]], top_k=2), tmp_path / "moe")
    s = result.summary
    assert (s["target"], s["architecture"], s["num_experts"], s["top_k"]) == ("mixtral", "MixtralForCausalLM", 2, 2)
    forced = _forced(result)
    assert forced[0]["exact_expected"] and forced[1]["exact_expected"]
    assert forced[0]["max_abs_logit_diff"] <= 1e-4 and forced[1]["max_abs_logit_diff"] <= 1e-4
    # the experts really are the sources' FFNs (byte copies) and the rest is the base
    out = load_file(tmp_path / "moe" / "model.safetensors")
    a, base = load_file(llama["a"] / "model.safetensors"), load_file(llama["base"] / "model.safetensors")
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.0.w1.weight"],
                       a["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.layers.1.mlp.gate_proj.weight"], base["model.layers.1.mlp.gate_proj.weight"])
    sp = result.verification["specificity"]
    assert set(sp["top1"]) == {"0", "1", "2"} and sp["mean_top1"] > sp["chance_top1"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_verify_force_expert_cli(llama, tmp_path, top_k):
    """Every token to expert e reproduces source e (top-1, and top-2 with renormalised weights); the other
    source is measured, not reproduced."""
    cfg = config(llama["base"], [llama["a"], llama["b"]], top_k=top_k)
    _merge(cfg, tmp_path / "moe")  # verification records which sources differ from the base only in their FFN
    for expert, source in enumerate((llama["a"], llama["b"])):
        result = run_cli("verify", source, tmp_path / "moe", "--force-expert", expert, "--json", "-q",
                         "--max-new-tokens", "2")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["exact_expected"] and report["passed"] and report["max_abs_logit_diff"] <= 1e-4
    wrong = json.loads(run_cli("verify", llama["b"], tmp_path / "moe", "--force-expert", 0, "--json", "-q",
                               "--max-new-tokens", "0").stdout)
    assert wrong["max_abs_logit_diff"] > 1e-3


def test_identical_sources_give_the_base(llama, tmp_path):
    result = _merge(config(llama["base"], [llama["copy"], llama["base"], llama["copy"]], top_k=2), tmp_path / "moe")
    assert result.summary["exact"] is True and result.verification["base"]["passed"]
    assert max_logit_diff(llama["base"], tmp_path / "moe") <= 1e-5
    avg = _merge(config(llama["base"], [llama["copy"], llama["base"]], shared_weights="average"), tmp_path / "avg")
    assert avg.summary["exact"] is True and max_logit_diff(llama["base"], tmp_path / "avg") <= 1e-5


def test_average_shared_weights(llama, tmp_path):
    """shared_weights: average is the mean of the listed sources and the base; the FFN-only source is not
    reproduced exactly any more, and says so."""
    result = _merge(config(llama["base"], [llama["a"], llama["attn"]], shared_weights="average"), tmp_path / "moe")
    out = load_file(tmp_path / "moe" / "model.safetensors")
    key = "model.layers.2.self_attn.o_proj.weight"
    parts = [load_file(llama[n] / "model.safetensors")[key] for n in ("a", "attn", "base")]
    assert torch.allclose(out[key], sum(parts) / 3, atol=1e-7)
    forced = _forced(result)
    assert not forced[0]["exact_expected"] and forced[0]["max_abs_logit_diff"] > 1e-4


def test_attention_fine_tune_is_measured_not_claimed(llama, tmp_path):
    result = _merge(config(llama["base"], [llama["a"], llama["attn"]]), tmp_path / "moe")
    forced = _forced(result)
    assert forced[0]["exact_expected"] and forced[0]["max_abs_logit_diff"] <= 1e-4
    assert not forced[1]["exact_expected"] and forced[1]["max_abs_logit_diff"] > 1e-4


def _routers(folder: Path) -> dict[int, torch.Tensor]:
    state = load_file(folder / "model.safetensors")
    return {int(k.split(".")[2]): v for k, v in state.items() if k.endswith("block_sparse_moe.gate.weight")}


@pytest.mark.parametrize("init", ["hidden", "embed", "domain", "normal", "uniform", "zeros"])
def test_router_inits(llama, tmp_path, init):
    cfg = config(llama["base"], [llama["a"], llama["b"], llama["a"]], router_init=init, router_std=0.1, top_k=1)
    for i, expert in enumerate(cfg["experts"]):
        text = tmp_path / f"domain{i}.txt"
        text.write_text(" ".join([PROMPTS[i][0]] * 12))
        expert["calibration"] = str(text)
    _merge(cfg, tmp_path / "moe", verify=False)
    rows = _routers(tmp_path / "moe")
    assert sorted(rows) == [0, 1, 2] and all(r.shape == (3, 64) for r in rows.values())
    if init == "zeros":
        assert all(not r.any() for r in rows.values())
        return
    norms = torch.stack([r.norm(dim=1) for r in rows.values()])
    if init in ("hidden", "embed", "domain"):  # centred, then the norm of a N(0, 0.1^2) row
        assert torch.allclose(norms, torch.full_like(norms, 0.1 * 64 ** 0.5), rtol=1e-3)
        assert not torch.allclose(rows[0][0], rows[0][1])
        same_layers = torch.equal(rows[0], rows[1])
        assert same_layers == (init == "embed")
    elif init == "normal":
        assert 0.07 < float(torch.stack(list(rows.values())).std()) < 0.13
    else:  # uniform: nn.Linear's default, U(-1/8, 1/8) for hidden 64
        values = torch.stack(list(rows.values()))
        assert float(values.abs().max()) <= 1 / 8 and float(values.abs().max()) > 0.1


def test_hidden_router_reads_the_ffn_inputs(llama):
    """Hidden rows are the FFN-input means of each expert's prompts, centred over the experts."""
    from upcycle.calibration import calibration_tokenizer
    from upcycle.families import family_for_model_type
    from upcycle.io import open_source
    from upcycle.merge.probe import FfnInputs, encode_prompts
    from upcycle.merge.routers import hidden_rows

    src = open_source(str(llama["base"]))
    family, tokenizer = family_for_model_type("llama"), calibration_tokenizer(src)
    cfg = load_config(config(llama["base"], [llama["a"], llama["b"]]))
    rows = hidden_rows(cfg, src, family, [0, 2], tokenizer)
    with FfnInputs(src, family, [0, 2]) as model:
        means = [model.mean(encode_prompts(tokenizer, e.prompts)) for e in cfg.experts]
    for layer in (0, 2):
        centred = means[0][layer] - (means[0][layer] + means[1][layer]) / 2
        assert torch.allclose(rows[layer][0] / rows[layer][0].norm(), centred / centred.norm(), atol=1e-5)


@pytest.mark.parametrize("family,target,expert_key", [
    ("llama", "upcycle", "model.layers.0.mlp.experts.1.up_proj.weight"),
    ("qwen2", "qwen2_moe", "model.layers.0.mlp.experts.1.up_proj.weight"),
    ("qwen3", "qwen3_moe", "model.layers.0.mlp.experts.1.up_proj.weight"),
    ("granite", "granitemoe", None),
    ("phi3", "mixtral", "model.layers.0.block_sparse_moe.experts.1.w3.weight"),
    ("gpt2", "upcycle", "transformer.h.0.mlp.experts.1.up_proj.weight"),
    ("cohere2", "cohere2_moe", None),
    ("ernie4_5", "ernie4_5_moe", None),
    ("olmo2", "flex_olmo", None),
])
def test_targets_hold_the_merge(tmp_path, family, target, expert_key):
    """Each target that can hold a merge (the auto choice, or the bundled model) reproduces each source
    with every token sent to its expert, including fused (Phi-3) and Conv1D (GPT-2) checkpoints."""
    base = make_base(family, tmp_path / "base")
    a, b = fine_tune(base, tmp_path / "a", 1, part="mlp"), fine_tune(base, tmp_path / "b", 2, part="mlp")
    result = _merge(config(base, [a, b], top_k=2, target=target), tmp_path / "moe")
    assert result.summary["target"] == target
    forced = _forced(result)
    assert all(row["exact_expected"] and row["max_abs_logit_diff"] <= 1e-4 for row in forced.values()), forced
    if expert_key:
        assert expert_key in load_file(tmp_path / "moe" / "model.safetensors")


@pytest.mark.parametrize("family,target,shared_down", [
    ("qwen3", "dots1", "model.layers.{i}.mlp.shared_experts.down_proj.weight"),
    ("granite", "granitemoeshared", "model.layers.{i}.shared_mlp.output_linear.weight"),
    ("hunyuan_v1_dense", "hunyuan_v1_moe", "model.layers.{i}.mlp.shared_mlp.down_proj.weight"),
])
def test_shared_expert_targets(tmp_path, family, target, shared_down):
    """Targets with an always-on shared MLP (skipped by auto without a shared_expert) are picked with one and
    hold it as is, not half of the base's FFN; every token to expert e then adds the shared expert, so each
    source is measured, not claimed exact."""
    base = make_base(family, tmp_path / "base")
    a, b, c = (fine_tune(base, tmp_path / n, i) for i, n in enumerate("abc", 1))
    result = _merge(config(base, [a, b], top_k=1, shared_expert={"source": str(c)}), tmp_path / "moe")
    assert (result.summary["target"], result.summary["shared_expert"]) == (target, str(c))
    out, src = load_file(tmp_path / "moe" / "model.safetensors"), load_file(c / "model.safetensors")
    for i in range(3):
        assert torch.equal(out[shared_down.format(i=i)], src[f"model.layers.{i}.mlp.down_proj.weight"])
    forced = _forced(result)
    assert all(not row["exact_expected"] and row["max_abs_logit_diff"] > 1e-3 for row in forced.values()), forced
    assert _merge(config(base, [a, b], top_k=1), tmp_path / "plain", dry_run=True).summary["target"] != target


def _in_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """A copy of ``folder`` where the Hugging Face cache keeps ``repo_id``'s snapshots (so it has a Hub id)."""
    org, name = repo_id.split("/")
    snapshot = cache / f"models--{org}--{name}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    return snapshot


def test_mergekit_config_as_is(llama, tmp_path):
    base, a, b = (_in_hub_cache(llama[k], tmp_path / "hub", f"org/{k}") for k in ("base", "a", "b"))
    text = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
            "experts": [{"source_model": str(a), "positive_prompts": PROMPTS[0], "negative_prompts": PROMPTS[2]},
                        {"source_model": str(b), "positive_prompts": PROMPTS[1]}]}
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(text))
    result = run_cli("merge", path, tmp_path / "moe", "--json", "-q")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert (s["config_format"], s["router_init"], s["top_k"], s["dtype"]) == ("mergekit", "hidden", 1, "float32")
    assert all(row["max_abs_logit_diff"] <= 1e-4 for row in s["verification"]["sources"])
    card = (tmp_path / "moe" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["org/base", "org/a", "org/b"]
    assert meta["base_model_relation"] == "merge"
    recipe = read_json(tmp_path / "moe" / "upcycle_recipe.json")
    assert recipe["upcycle"]["merge"]["experts"][0]["negative_prompts"] == PROMPTS[2]
    assert recipe["upcycle"]["merge"]["forced_exact"] == [True, True]
    assert f"| 1 | `{b}` | 2 |" in card and "--force-expert E" in card and "Routing specificity" in card


@pytest.mark.parametrize("gate_mode,router,std", [("cheap_embed", "embed", 0.02), ("random", "normal", 1.0),
                                                  ("uniform_random", "uniform", 0.02), ("hidden", "hidden", 0.02)])
def test_mergekit_gate_modes(gate_mode, router, std):
    cfg = load_config({"base_model": "org/base", "gate_mode": gate_mode, "experts": [
        {"source_model": "org/a@v2", "positive_prompts": ["x"], "noise_scale": 0.01, "residual_scale": 0.5},
        {"source_model": "org/b", "positive_prompts": ["y"]}]})
    assert (cfg.format, cfg.router_init, cfg.router_std, cfg.top_k) == ("mergekit", router, std, 2)
    assert (cfg.experts[0].revision, cfg.experts[0].noise_std, cfg.experts[0].residual_scale) == ("v2", 0.01, 0.5)


def test_mergekit_shared_expert_maps_to_qwen2_moe(tmp_path):
    base = make_base("qwen2", tmp_path / "base")
    a, b, c = (fine_tune(base, tmp_path / n, i) for i, n in enumerate("abc", 1))
    cfg = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 1,
           "experts": [{"source_model": str(a)}, {"source_model": str(b)}],
           "shared_experts": [{"source_model": str(c), "positive_prompts": ["the"]}]}
    result = _merge(cfg, tmp_path / "moe", verify=False)
    assert result.summary["target"] == "qwen2_moe" and result.summary["shared_expert_size"] == 96
    assert result.config.notes and "prompts ignored" in result.config.notes[0]
    out, src = load_file(tmp_path / "moe" / "model.safetensors"), load_file(c / "model.safetensors")
    assert torch.equal(out["model.layers.1.mlp.shared_expert.down_proj.weight"],
                       2 * src["model.layers.1.mlp.down_proj.weight"])
    assert not out["model.layers.1.mlp.shared_expert_gate.weight"].any()


def test_shared_expert_on_llama_goes_to_the_bundled_model(llama, tmp_path):
    cfg = config(llama["base"], [llama["a"], llama["b"]], router_init="zeros",
                 shared_expert={"source": str(llama["attn"])})
    assert _merge(cfg, tmp_path / "moe", dry_run=True).summary["target"] == "upcycle"
    with pytest.raises(UnsupportedArchitectureError, match="mixtral has no shared expert"):
        _merge({**cfg, "target": "mixtral"}, tmp_path / "moe", dry_run=True)


def test_hub_sources_offline(llama, tmp_path, monkeypatch):
    """Hub repo ids (here from an offline cache) as base and experts: the card lists their ids, verification
    opens each downloaded snapshot."""
    from huggingface_hub import constants

    for name in ("base", "a", "b"):
        cache_repo(tmp_path / "cache", f"org/{name}", {"a" * 40: llama[name]}, {"main": "a" * 40})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = _merge({"base_model": "org/base", "top_k": 1, "experts": [
        {"source": "org/a", "prompts": PROMPTS[0]}, {"source": "org/b", "prompts": PROMPTS[1]}]}, tmp_path / "moe")
    assert all(row["exact_expected"] and row["max_abs_logit_diff"] <= 1e-4 for row in result.verification["sources"])
    meta = yaml.safe_load((tmp_path / "moe" / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == ["org/base", "org/a", "org/b"] and meta["base_model_relation"] == "merge"


def _card_meta(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_card_base_model_for_local_sources(llama, tmp_path):
    """Local sources get their ids as convert finds them: a cache snapshot's org/name, a config _name_or_path
    that is a repo id; a plain folder has none (it is still listed under Experts)."""
    base = _in_hub_cache(llama["base"], tmp_path / "hub", "org/base")
    named = tmp_path / "a-named"
    shutil.copytree(llama["a"], named)
    cfg = read_json(named / "config.json")
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/a-ft"}))
    _merge(config(base, [named, llama["b"]], router_init="zeros"), tmp_path / "moe", verify=False)
    meta = _card_meta(tmp_path / "moe")
    assert (meta["base_model"], meta["base_model_relation"]) == (["org/base", "org/a-ft"], "merge")
    assert f"`{llama['b']}`" in (tmp_path / "moe" / "README.md").read_text()


def test_base_model_option_names_the_card_ids(llama, tmp_path):
    """--base-model (repeatable), the config key card_base_model and the API keyword replace the derived ids;
    the base source stays the config's base_model."""
    cfg = config(llama["base"], [llama["a"], llama["b"]], router_init="zeros")
    result = run_cli("merge", _write(tmp_path, cfg), tmp_path / "cli", "-q", "--no-verify",
                     "--base-model", "Org/base", "--base-model", "Org/code-ft")
    assert result.exit_code == 0, result.output
    meta = _card_meta(tmp_path / "cli")
    assert (meta["base_model"], meta["base_model_relation"]) == (["Org/base", "Org/code-ft"], "merge")
    recorded = read_json(tmp_path / "cli" / "upcycle_recipe.json")["upcycle"]["merge"]
    assert recorded["card_base_model"] == ["Org/base", "Org/code-ft"] and recorded["base_model"] == str(llama["base"])
    _merge({**cfg, "card_base_model": "Org/only"}, tmp_path / "file", verify=False)
    meta = _card_meta(tmp_path / "file")
    assert (meta["base_model"], meta["base_model_relation"]) == (["Org/only"], "finetune")
    _merge(cfg, tmp_path / "api", verify=False, card_base_model=["Org/x", "Org/y"])
    assert _card_meta(tmp_path / "api")["base_model"] == ["Org/x", "Org/y"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_base_model_on_merge_is_one_error_line(llama, tmp_path, dry_run):
    path = _write(tmp_path, config(llama["base"], [llama["a"], llama["b"]], router_init="zeros"))
    out = tmp_path / "moe"
    result = run_cli("merge", path, out, "-q", "--base-model", "Org/fine", "--base-model", "a/b/c",
                     *(["--dry-run"] if dry_run else []))
    assert_clean_error(result, out, "--base-model", "'a/b/c'", "namespace/name")
    with pytest.raises(RecipeError, match="card_base_model"):
        load_config({**config(llama["base"], [llama["a"]], router_init="zeros", top_k=1), "card_base_model": [3]})


def test_dry_run_reads_only_headers(llama, tmp_path, monkeypatch):
    from upcycle.io.folder import SafetensorsFolder

    def refuse(self, name):
        raise AssertionError(f"dry run read tensor {name}")

    monkeypatch.setattr(SafetensorsFolder, "read", refuse)
    result = run_cli("merge", _write(tmp_path, config(llama["base"], [llama["a"], llama["b"]])), tmp_path / "out",
                     "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dry_run"] is True and not (tmp_path / "out").exists()


def _write(folder: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_text_output_and_overrides(llama, tmp_path):
    path = _write(tmp_path, config(llama["base"], [llama["a"], llama["b"]], router_init="zeros"))
    result = run_cli("merge", path, tmp_path / "moe", "-q", "--target", "upcycle", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "(upcycle)" in result.stdout and "every token to expert 1" in result.stdout
    assert read_json(tmp_path / "moe" / "config.json")["dtype"] == "bfloat16"
    info = upcycle.inspect(tmp_path / "moe")
    assert (info["recipe"]["method"], info["recipe"]["router_init"], info["num_experts"]) == ("merge", "zeros", 2)
    assert "note" not in info  # experts are not identical copies


def test_bad_configs(llama, tmp_path):
    qwen = make_base("qwen2", tmp_path / "qwen")
    wide = make_base("llama", tmp_path / "wide", intermediate_size=128)
    out = tmp_path / "out"
    cases = [
        (config(llama["base"], [llama["a"], qwen]), "'qwen2' model"),
        (config(llama["base"], [llama["a"], wide]), "config key 'intermediate_size' is 128"),
        (config(llama["base"], [llama["a"], tmp_path / "missing"]), "experts[1]"),
        ({**config(llama["base"], [llama["a"], llama["b"]]), "colour": "red"}, "unknown merge config key(s): colour"),
        ({"base_model": str(llama["base"]), "experts": [{"source": str(llama["a"]), "prompts": ["the"]},
                                                         {"source": str(llama["b"])}]}, "experts[1]"),
        ({"base_model": str(llama["base"]), "gate_mode": "hidden_last",
          "experts": [{"source_model": str(llama["a"]), "positive_prompts": ["the"]}]}, "hidden_last"),
        ({"base_model": str(llama["base"]), "architecture": "deepseek", "experts_per_token": 1,
          "experts": [{"source_model": str(llama["a"]), "positive_prompts": ["the"]}]}, "deepseek"),
        ({"base_model": str(llama["base"]), "experts_per_token": 1,
          "experts": [{"source_model": f"{llama['a']}+some/lora", "positive_prompts": ["the"]}]}, "LoRA"),
        ({"base_model": str(llama["base"]), "experts_per_token": 1, "tokenizer_source": "base",
          "experts": [{"source_model": str(llama["a"]), "positive_prompts": ["the"]}]}, "tokenizer_source"),
        (config(llama["base"], [llama["a"], llama["b"]], router_init="domain"), "calibration"),
        ({"base_model": str(llama["base"]), "architecture": "qwen", "experts_per_token": 1,
          "experts": [{"source_model": str(llama["a"]), "positive_prompts": ["the"]}]},
         "architecture (target qwen2_moe)"),
    ]
    for i, (cfg, fragment) in enumerate(cases):
        result = run_cli("merge", _write(tmp_path, cfg, f"bad{i}.yaml"), out, "-q")
        assert_clean_error(result, out, fragment)


def test_bad_config_error_types(llama, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"experts\[0\]"):
        _merge(config(llama["base"], [tmp_path / "nope"], top_k=1), tmp_path / "o", dry_run=True)
    with pytest.raises(RecipeError, match="has no prompts"):
        load_config({"experts": [{"source": "x"}], "top_k": 1})
    with pytest.raises(RecipeError, match="experts\\[1\\] \\(b\\) has no positive_prompts"):
        load_config({"base_model": "a", "experts": [{"source_model": "a", "positive_prompts": ["x"]},
                                                    {"source_model": "b"}]})
    with pytest.raises(RecipeError, match="experts_per_token must be between 1 and the number of experts \\(1\\)"):
        load_config({"base_model": "a", "experts": [{"source_model": "a", "positive_prompts": ["x"]}]})
    with pytest.raises(UnsupportedArchitectureError, match="'qwen2' model"):
        _merge(config(llama["base"], [make_base("qwen2", tmp_path / "q")], top_k=1), tmp_path / "o", dry_run=True)


def test_same_config_same_bytes(llama, tmp_path):
    """A merge is reproducible: the same config and seed give byte-identical files."""
    from checks import tree_hashes

    cfg = config(llama["base"], [llama["a"], llama["b"]], router_init="hidden", seed=3,
                 experts=[{"source": str(llama["a"]), "prompts": PROMPTS[0], "noise_std": 0.01},
                          {"source": str(llama["b"]), "prompts": PROMPTS[1]}])
    first, second = (tree_hashes(_merge(cfg, tmp_path / name, verify=False).output) for name in ("one", "two"))
    assert first == second and "model.safetensors" in first


def test_gguf_sources(tmp_path):
    """A .gguf file as base and experts (one file listed twice): identical sources give the base exactly."""
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(tmp_path)
    result = _merge({"base_model": str(gguf), "top_k": 1, "experts": [
        {"source": str(gguf), "prompts": ["hello world"]}, {"source": str(gguf), "prompts": ["def f(x):"]}]},
        tmp_path / "moe")
    assert result.summary["exact"] is True and result.verification["base"]["max_abs_logit_diff"] <= 1e-5


def test_ffn_inputs_stream_what_the_whole_model_computes(llama):
    """The hidden/domain probe runs the base one layer at a time; its FFN inputs equal a whole-model forward's."""
    from transformers import AutoModelForCausalLM

    from upcycle.calibration import calibration_tokenizer
    from upcycle.families import family_for_model_type
    from upcycle.io import open_source
    from upcycle.merge.probe import FfnInputs, encode_prompts, ffn_module_name

    src = open_source(str(llama["base"]))
    family, tokenizer = family_for_model_type("llama"), calibration_tokenizer(src)
    sequences = encode_prompts(tokenizer, ["def fibonacci(n):", "Once upon a time there was"])
    with FfnInputs(src, family, [0, 2]) as probe:
        streamed = probe.mean(sequences)
    model = AutoModelForCausalLM.from_pretrained(llama["base"], dtype=torch.float32).eval()
    modules, seen = dict(model.named_modules()), {0: [], 2: []}
    for layer in (0, 2):
        modules[ffn_module_name(family, layer)].register_forward_pre_hook(
            lambda m, args, layer=layer: seen[layer].append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids, _ in sequences:
            model(ids.view(1, -1))
    for layer in (0, 2):
        whole = torch.cat([s[keep] for s, (_, keep) in zip(seen[layer], sequences)]).mean(0)
        assert torch.allclose(streamed[layer], whole, atol=1e-5), float((streamed[layer] - whole).abs().max())


def _whole_model_specificity(folder: Path, prompts: list[list[str]]) -> dict[str, list[float]]:
    """Reference: the whole MoE loaded with transformers; each router's logits from its block's input."""
    from transformers import AutoModelForCausalLM

    from upcycle.merge.probe import encode_prompts
    from upcycle.merge.specificity import num_experts_of
    from upcycle.tokenizer import load_tokenizer

    num_experts, top_k = num_experts_of(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    routers, seen = {}, {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.dim() == 2 and p.shape[0] == num_experts and name.endswith(("gate.weight", "router.weight")):
            layer = int(name.split(".layers.")[1].split(".")[0])
            routers[layer] = p
            block = modules[name.rsplit(".", 2)[0]]  # the MoE block: its input is what the router reads
            block.register_forward_pre_hook(
                lambda m, args, layer=layer: seen.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1])))
    top1 = {layer: [0] * num_experts for layer in routers}
    tokens = [0] * num_experts
    tokenizer = load_tokenizer(folder)
    with torch.no_grad():
        for expert, texts in enumerate(prompts):
            for ids, keep in encode_prompts(tokenizer, texts):
                model(ids.view(1, -1))
                tokens[expert] += int(keep.sum())
                for layer, weight in routers.items():
                    chosen = (seen[layer] @ weight.t()).topk(top_k, dim=-1).indices[keep]
                    top1[layer][expert] += int((chosen[:, 0] == expert).sum())
    return {str(l): [c / max(n, 1) for c, n in zip(top1[l], tokens)] for l in routers}


@pytest.mark.parametrize("target", ["mixtral", "upcycle"])
def test_streamed_specificity_equals_the_whole_model(llama, tmp_path, target):
    """The merge's routing specificity runs layer by layer; it counts what the whole loaded model routes."""
    from upcycle.merge.specificity import routing_specificity

    cfg = config(llama["base"], [llama["a"], llama["b"]], top_k=1)
    _merge(cfg, tmp_path / "moe", target=target, verify=False)
    prompts = [e["prompts"] for e in cfg["experts"]]
    streamed = routing_specificity(tmp_path / "moe", prompts)
    assert streamed["top1"] == _whole_model_specificity(tmp_path / "moe", prompts)
    assert sum(streamed["tokens"]) > 0 and set(streamed["top1"]) == {"0", "1", "2"}


@pytest.mark.parametrize("top,expert,fragment", [
    ({"router_std": float("nan")}, {}, "router_std must be a finite number, got nan"),
    ({"target": ["mixtral"]}, {}, "target must be a target name"),
    ({"seed": "x"}, {}, "seed must be an integer"),
    ({"calibration_tokens": True}, {}, "calibration_tokens must be an integer >= 1"),
    ({"base_model": 5}, {}, "base_model must be a string"),
    ({}, {"residual_scale": float("nan")}, "experts[0].residual_scale must be a finite number"),
    ({}, {"residual_scale": "big"}, "experts[0].residual_scale must be a finite number, got 'big'"),
    ({}, {"residual_scale": 0}, "experts[0].residual_scale must be > 0"),
    ({}, {"noise_std": float("inf")}, "experts[0].noise_std must be a finite number"),
    ({}, {"revision": ["main"]}, "experts[0].revision must be a string"),
    ({}, {"calibration": 3}, "experts[0].calibration must be a path"),
])
def test_config_values_of_the_wrong_kind_are_refused(top, expert, fragment):
    """A value of the wrong type, or a NaN/infinite scale (a model of NaNs), is refused naming its key, not
    left to fail deep inside the merge (a TypeError) or to be written."""
    cfg = {"base_model": "org/base", "router_init": "zeros", "top_k": 1, "experts": [{"source": "org/a", **expert}]}
    with pytest.raises(RecipeError) as caught:
        load_config({**cfg, **top})
    assert fragment in str(caught.value)


def test_mergekit_scales_are_checked():
    expert = {"source_model": "org/a", "positive_prompts": ["x"]}
    for key, value in (("noise_scale", float("nan")), ("residual_scale", "big"), ("residual_scale", -1.0),
                       ("residual_scale", 0)):  # a given 0 is not taken for "absent" (it used to become 1.0)
        with pytest.raises(RecipeError, match=rf"experts\[0\]\.{key} must be"):
            load_config({"base_model": "org/base", "experts_per_token": 1, "experts": [{**expert, key: value}]})
    given = {"base_model": "org/base", "experts_per_token": 1,
             "experts": [{**expert, "noise_scale": 0, "residual_scale": None}]}
    assert (load_config(given).experts[0].noise_std, load_config(given).experts[0].residual_scale) == (0.0, 1.0)


def test_config_files_are_read_like_recipe_files(tmp_path):
    """YAML aliases (a few lines that expand into gigabytes when printed) and JSON NaN are refused, one line."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('experts: [{source: a}]\nrouter_init: zeros\ntop_k: 1\nx: &a ["x", "x"]\n'
                    "dtype: [*a, *a]\n")
    assert_clean_error(run_cli("merge", bomb, tmp_path / "out", "-q"), tmp_path / "out", "aliases", "bomb.yaml")
    nan = tmp_path / "nan.json"
    nan.write_text('{"experts": [{"source": "a"}], "router_init": "zeros", "top_k": 1, "router_std": NaN}')
    assert_clean_error(run_cli("merge", nan, tmp_path / "out", "-q"), tmp_path / "out", "NaN", "nan.json")
    assert_clean_error(run_cli("merge", tmp_path / "none.yaml", tmp_path / "out", "-q"), tmp_path / "out",
                       "merge config file not found")


def test_first_differing_tensor_is_named(llama, tmp_path):
    """Same config, different tensors: a missing tensor, an extra one, one of another shape; the error names
    the config entry and the first tensor that differs, before any tensor is read (dry run too)."""
    from safetensors.torch import save_file

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(llama["a"], folder)
        state = load_file(folder / "model.safetensors")
        change(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    key = "model.layers.1.post_attention_layernorm.weight"
    cases = [(variant("missing", lambda s: s.pop(key)), f"it has no tensor {key}"),
             (variant("extra", lambda s: s.update({"model.extra.weight": torch.zeros(2)})),
              "it has a tensor the base lacks: model.extra.weight"),
             (variant("shape", lambda s: s.update({key: torch.ones(65)})),
              f"tensor {key} has shape [65], the base's is [64]")]
    for source, fragment in cases:
        for dry_run in ([], ["--dry-run"]):
            result = run_cli("merge", _write(tmp_path, config(llama["base"], [llama["b"], source])), tmp_path / "out",
                             "-q", *dry_run)
            assert_clean_error(result, tmp_path / "out", f"experts[1].source ({source}) does not match the base", fragment)


def test_negative_prompts_keep_every_expert_reachable():
    """Hidden states share a large component (a few channels of large activations). An expert whose negative
    prompts cancel it must not lose all tokens to the experts that keep it: each expert's own prompts still
    route to it, and its negative prompts (here another expert's topic) route away from it."""
    from upcycle.merge.routers import contrast, finish_rows

    gen = torch.Generator().manual_seed(0)
    common = torch.zeros(64)
    common[:4] = 50.0
    topics = [common + torch.cat([torch.zeros(4), torch.randn(60, generator=gen)]) for _ in range(3)]
    positive = torch.stack(topics)
    for negative in ([None, None, None], [topics[1], None, None], [None, None, topics[0]],
                     [topics[2], topics[0], None]):
        rows = finish_rows(contrast(positive, negative), 0.02)
        assert (positive @ rows.t()).argmax(-1).tolist() == [0, 1, 2], negative
        for expert, neg in enumerate(negative):
            if neg is not None:
                assert int((neg @ rows.t()).argmax()) != expert
    assert torch.equal(contrast(positive, [None] * 3), positive)  # without negatives: the positive means
