"""Loading the bundled model: Auto classes after ``import upcycle``, ``trust_remote_code`` where upcycle is
not installed, and ``UpcycleMoeForCausalLM.from_pretrained`` on native Mixtral / Qwen2-MoE / Qwen3-MoE."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from factories import EXACT_ATOL, VOCAB, _randomise_norms, make_dense

from upcycle.convert import convert

ROOT = Path(__file__).resolve().parents[1]
IDS = [[5, 17, 3, 60, 22, 9, 41], [1, 2, 88, 13, 13, 70, 4]]


def _dense_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


_LOAD = """
import json, sys, importlib.util
{prelude}
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, {kwargs}).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save(logits, sys.argv[3])
print(json.dumps({{"module": type(model).__module__, "cls": type(model).__name__,
                   "upcycle_importable": importlib.util.find_spec("upcycle") is not None}}))
"""


def _run(cmd: list[str], cwd: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    dense = make_dense("phi3", root / "dense", partial_rotary_factor=0.5)
    convert(dense, root / "moe", target="upcycle", num_experts=3, top_k=2, quiet=True, verify=False)
    return dense, root / "moe"


def test_auto_class_resolves_after_import_upcycle(bundled, tmp_path):
    """Plain AutoModelForCausalLM.from_pretrained, no trust_remote_code: the installed class is used."""
    dense, moe = bundled
    # ``import upcycle`` must stay torch-free (it only hooks transformers' Auto modules for later).
    prelude = "import upcycle\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    script = _LOAD.format(prelude=prelude, kwargs="")
    info = _run([sys.executable, "-c", script, str(moe), json.dumps(IDS), str(tmp_path / "l.pt")], ROOT, tmp_path)
    assert info["module"] == "upcycle.modeling.modeling_upcycle_moe"
    assert info["cls"] == "UpcycleMoeForCausalLM"
    assert (torch.load(tmp_path / "l.pt") - _dense_logits(dense)).abs().max() <= EXACT_ATOL


def test_import_upcycle_stays_light():
    done = subprocess.run([sys.executable, "-c", "import sys, upcycle; print('torch' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("first", ["upcycle.modeling.configuration_upcycle_moe", "transformers.models.auto.modeling_auto"])
def test_registration_whatever_is_imported_first(first):
    script = (f"import {first}, upcycle\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
              "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M\n"
              "from upcycle.modeling import UpcycleMoeConfig as C, UpcycleMoeForCausalLM as L\n"
              "print(AutoConfig.for_model('upcycle_moe').__class__ is C and M[C] is L)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def _fresh_venv(folder) -> str:
    """A new virtual environment with only torch, transformers and safetensors (the installed versions)."""
    import safetensors
    import transformers

    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"safetensors=={safetensors.__version__}"]
    done = subprocess.run([python, "-m", "pip", "install", "-q", *pins], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, f"building the fresh venv failed: {done.stderr[-2000:]}"
    return python


@pytest.fixture(scope="module")
def isolated_python(tmp_path_factory) -> list[str]:
    """An interpreter that sees torch and transformers but not upcycle.

    - ``UPCYCLE_ISOLATED_PYTHON`` names one to use;
    - in CI (``CI`` set) or with ``UPCYCLE_FRESH_VENV=1``: a fresh virtual environment built here with
      only torch, transformers and safetensors (about a minute with pip's cache);
    - otherwise this interpreter in isolated mode (-I -S) with site-packages added by hand, without
      running its .pth files, so the editable upcycle install is invisible.
    """
    if os.environ.get("UPCYCLE_ISOLATED_PYTHON"):
        return [os.environ["UPCYCLE_ISOLATED_PYTHON"], "-I"]
    if os.environ.get("CI") or os.environ.get("UPCYCLE_FRESH_VENV"):
        return [_fresh_venv(tmp_path_factory.mktemp("fresh")), "-I"]
    purelib = sysconfig.get_paths()["purelib"]
    return [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({purelib!r}); sys.argv.pop(0); "
            "exec(compile(sys.argv[0], '<load>', 'exec'))"]


def test_trust_remote_code_without_upcycle(bundled, tmp_path, isolated_python):
    dense, moe = bundled
    script = _LOAD.format(prelude="", kwargs="trust_remote_code=True")
    python = isolated_python
    cmd = python + ([script] if python[-1].startswith("import sys") else ["-c", script])
    cmd += [str(moe), json.dumps(IDS), str(tmp_path / "l.pt")]
    info = _run(cmd, tmp_path, tmp_path)
    assert not info["upcycle_importable"]
    assert info["module"].startswith("transformers_modules"), info
    assert (torch.load(tmp_path / "l.pt") - _dense_logits(dense)).abs().max() <= EXACT_ATOL


def test_moe_settings_on_the_text_config(bundled, tmp_path):
    """get_text_config() (where TRL reads them) holds the MoE keys; one value through either config; the file keeps
    them at the top level only, as files written before did, and such a file loads with them on the text config."""
    from transformers import AutoConfig

    from upcycle.modeling.configuration_upcycle_moe import TEXT_CONFIG_MOE_KEYS

    _, moe = bundled
    written = json.loads((moe / "config.json").read_text())
    assert not set(TEXT_CONFIG_MOE_KEYS) & set(written["text_config"])
    config = AutoConfig.from_pretrained(moe)
    text = config.get_text_config()
    assert text is config.text_config and type(text).__name__ == "Phi3Config"
    assert {k: getattr(text, k) for k in TEXT_CONFIG_MOE_KEYS} == {k: written[k] for k in TEXT_CONFIG_MOE_KEYS}
    assert (text.num_experts, text.num_experts_per_tok, text.output_router_logits) == (3, 2, False)
    text.router_aux_loss_coef, text.output_router_logits = 0.05, True  # as TRL's SFTTrainer sets them
    assert (config.router_aux_loss_coef, config.output_router_logits) == (0.05, True)
    config.output_router_logits = False
    assert text.output_router_logits is False
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["router_aux_loss_coef"], saved["output_router_logits"]) == (0.05, False)
    assert not set(TEXT_CONFIG_MOE_KEYS) & set(saved["text_config"])
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.get_text_config().router_aux_loss_coef == reloaded.router_aux_loss_coef == 0.05


def test_base_model_returns_hidden_states_and_router_logits(bundled):
    """model.base_model (what TRL's fused LM head calls): the last hidden state and, on request, the router logits."""
    from transformers import AutoModelForCausalLM

    _, moe = bundled
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        full = model(ids, output_router_logits=True)
        backbone = model.base_model(input_ids=ids, output_router_logits=True, use_cache=False)
        plain = model.base_model(input_ids=ids)
    assert backbone.last_hidden_state.shape == (2, len(IDS[0]), model.config.text_config.hidden_size)
    assert torch.equal(model.get_output_embeddings()(backbone.last_hidden_state), full.logits)
    assert len(backbone.router_logits) == len(model.config.moe_layers) == len(full.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(backbone.router_logits, full.router_logits))
    assert plain.router_logits is None and torch.equal(plain.last_hidden_state, backbone.last_hidden_state)
    assert model.base_model.embed_tokens is model.get_input_embeddings()  # other attributes: the dense backbone's
    assert all(block.router_logits_sink is None for block in model.moe_blocks)


def _native(kind: str):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128)
    if kind == "mixtral":
        return MixtralConfig(**base, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=5)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(**base, intermediate_size=80, moe_intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2, shared_expert_intermediate_size=40, norm_topk_prob=False,
                              mlp_only_layers=[1], tie_word_embeddings=True)
    return Qwen3MoeConfig(**base, head_dim=24, intermediate_size=80, moe_intermediate_size=32, num_experts=4,
                          num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_native_checkpoints_load_with_same_logits(tmp_path, kind):
    """Random native MoE models (distinct experts, random routers): same logits through the bundled class."""
    from transformers import AutoModelForCausalLM

    from upcycle.modeling import UpcycleMoeForCausalLM

    torch.manual_seed(0)
    native = AutoModelForCausalLM.from_config(_native(kind)).eval()
    _randomise_norms(native, torch.Generator().manual_seed(1))
    native.save_pretrained(tmp_path)
    native = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = UpcycleMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in native.parameters())
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert (native(ids).logits - ours(ids).logits).abs().max() <= EXACT_ATOL
