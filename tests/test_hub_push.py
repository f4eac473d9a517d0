"""Hub reading and publishing against a local stand-in of the Hub HTTP API (``tests/hub_server.py``).

The real huggingface_hub client talks to the stand-in on 127.0.0.1: in-process through its
``constants`` (read at import time, so the fixture patches them as well as the environment), and
once in a subprocess through ``HF_ENDPOINT``/``HF_TOKEN``/``HF_HUB_OFFLINE`` alone. Xet is disabled
(``HF_HUB_DISABLE_XET``) because the stand-in speaks plain git-LFS only; see its docstring for the
other limits (no multipart, no CDN redirects, no history). Select with ``pytest -k "hub or push"``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import EXACT_ATOL, make_dense, read_json, save_tiny_tokenizer
from hub_server import Fault, HubStandIn

from upcycle.cli import cli

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_token"
DENSE_CARD = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n# tiny dense model\n"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny llama upcycled into a 4-shard Mixtral (verified at conversion time)."""
    base = tmp_path_factory.mktemp("hub")
    dense = make_dense("llama", base / "dense")
    out = base / "moe"
    result = CliRunner().invoke(cli, ["convert", str(dense), str(out), "-e", "4", "-k", "2",
                                      "--max-shard-size", "300KB", "-q"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


@pytest.fixture
def moe(converted, tmp_path) -> Path:
    """A private copy of the converted folder (a push fills the repo id into its card)."""
    return Path(shutil.copytree(converted, tmp_path / "moe"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub pointed at it, online, a token set and an empty cache."""
    import huggingface_hub.constants as constants

    server = HubStandIn(tokens=(TOKEN,)).start()
    env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name, value in {"ENDPOINT": server.url, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True,
                        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
                        "HF_TOKEN_PATH": str(tmp_path / "hf-home" / "token")}.items():
        monkeypatch.setattr(constants, name, value)
    yield server
    server.stop()


def _local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_push_uploads_a_complete_byte_identical_copy(hub, moe):
    local = _local_files(moe)
    (moe / ".DS_Store").write_bytes(b"junk")  # hidden files are not part of the model
    result = CliRunner().invoke(cli, ["push", str(moe), "tester/tiny-moe", "-q"])
    assert result.exit_code == 0, result.output
    assert f"to {hub.url}/tester/tiny-moe" in result.output
    remote = hub.files("tester/tiny-moe")
    local["README.md"] = (moe / "README.md").read_bytes()
    assert set(remote) == set(local) | {".gitattributes"}
    assert all(remote[name] == data for name, data in local.items())
    card = remote["README.md"].decode()
    assert '"tester/tiny-moe"' in card and "THIS_REPO" not in card
    assert len(hub.requests("PUT", "/_lfs/")) == len(list(moe.glob("*.safetensors")))


def test_push_again_sends_nothing_new(hub, moe):
    assert CliRunner().invoke(cli, ["push", str(moe), "tester/again", "-q"]).exit_code == 0
    puts = len(hub.requests("PUT"))
    result = CliRunner().invoke(cli, ["push", str(moe), "tester/again", "-q"])
    assert result.exit_code == 0, result.output
    assert len(hub.requests("PUT")) == puts


@pytest.mark.parametrize("fault,resent", [
    (Fault("PUT", r"^/_lfs/", 507, skip=1), "missing"),   # storage fails after the first shard arrived
    (Fault("POST", r"/commit/main$", 500), "none"),          # every shard uploaded, the commit fails
])
def test_push_resumes_after_a_server_error_mid_upload(hub, moe, fault, resent):
    hub.faults.append(fault)
    result = CliRunner().invoke(cli, ["push", str(moe), "tester/flaky", "-q"])
    line = _one_line_error(result)
    assert "did not complete" in line and "run the same command again" in line
    assert set(hub.files("tester/flaky")) == {".gitattributes"}  # nothing claimed, nothing committed
    stored_before = set(hub.lfs)
    shards = len(list(moe.glob("*.safetensors")))
    assert 1 <= len(stored_before) <= shards
    puts_before = len(hub.requests("PUT"))

    result = CliRunner().invoke(cli, ["push", str(moe), "tester/flaky", "-q"])
    assert result.exit_code == 0, result.output
    resent_oids = {p.rsplit("/", 1)[1] for p in hub.requests("PUT")[puts_before:]}
    assert not resent_oids & stored_before
    assert len(resent_oids) == shards - len(stored_before)
    if resent == "none":
        assert not resent_oids
    remote = hub.files("tester/flaky")
    assert all(remote[name] == data for name, data in _local_files(moe).items())


def test_push_without_token_fails_before_any_request(hub, moe, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(moe), "tester/x"]))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert hub.log == [] and hub.repos == {}


def test_push_with_a_rejected_token_says_so(hub, moe):
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(moe), "tester/x", "--token", "hf_wrong"]))
    assert "rejected the token" in line and "did not complete" in line
    assert hub.repos == {}


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad id", "org/-x-", "org/" + "x" * 100])
def test_push_refuses_a_malformed_repo_id(hub, moe, repo_id):
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(moe), repo_id]))
    assert "malformed repo id" in line
    assert hub.log == []


def test_push_to_an_unreachable_endpoint_fails_cleanly(hub, moe, monkeypatch):
    import huggingface_hub.constants as constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(moe), "tester/x", "-q"]))
    assert f"cannot reach the Hub at {dead}" in line and "did not complete" in line


@pytest.mark.parametrize("damage", ["missing_shard", "truncated_shard", "no_recipe", "no_config", "total_size"])
def test_push_refuses_an_incomplete_output(hub, moe, damage):
    shard = sorted(moe.glob("model-*.safetensors"))[1]
    if damage == "missing_shard":
        shard.unlink()
    elif damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "no_recipe":
        (moe / "upcycle_recipe.json").unlink()
    elif damage == "no_config":
        (moe / "config.json").unlink()
    else:
        index = read_json(moe / "model.safetensors.index.json")
        index["metadata"]["total_size"] += 4
        (moe / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(moe), "tester/x"]))
    expected = {"missing_shard": shard.name, "truncated_shard": "truncated", "no_recipe": "not an upcycle output",
                "no_config": "no config.json", "total_size": "total_size"}[damage]
    assert expected in line
    assert hub.log == []


def test_push_to_a_branch_a_pull_request_and_a_private_repo(hub, moe):
    runner = CliRunner()
    result = runner.invoke(cli, ["push", str(moe), "tester/branchy", "--revision", "dev", "--private", "-q",
                                 "--commit-message", "first upcycle"])
    assert result.exit_code == 0, result.output
    assert hub.repos["tester/branchy"].private
    assert set(hub.files("tester/branchy")) == {".gitattributes"}
    assert "README.md" in hub.files("tester/branchy", "dev")
    result = runner.invoke(cli, ["push", str(moe), "tester/branchy", "--create-pr", "-q"])
    assert result.exit_code == 0, result.output
    assert "pull request: " in result.output and "/discussions/1" in result.output
    assert set(hub.files("tester/branchy")) == {".gitattributes"}
    assert "README.md" in hub.files("tester/branchy", "refs/pr/1")
    line = _one_line_error(runner.invoke(cli, ["push", str(moe), "tester/branchy", "--create-pr", "--revision", "dev"]))
    assert "--create-pr" in line


def test_push_python_api_returns_where_it_landed(hub, moe):
    import upcycle

    result = upcycle.push(moe, "tester/api", quiet=True)
    assert result.repo_id == "tester/api" and result.revision == "main"
    assert sorted(result.files) == sorted(_local_files(moe))
    assert result.bytes == sum(len(b) for b in _local_files(moe).values())


def _publish_dense(hub: HubStandIn, folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


def test_hub_source_convert_push_and_offline_reconvert(hub, tmp_path, monkeypatch):
    """Publish a dense model, convert it by repo id with --push-to-hub, then again offline from the cache."""
    import huggingface_hub.constants as constants
    from huggingface_hub import ModelCard

    dense = make_dense("qwen3", tmp_path / "dense")
    save_tiny_tokenizer(dense)
    (dense / "README.md").write_text(DENSE_CARD)
    (dense / "training_state.bin").write_bytes(b"\0" * 4096)  # not needed: must not be downloaded
    _publish_dense(hub, dense, "org/tiny-dense")

    out = tmp_path / "moe"
    result = CliRunner().invoke(cli, ["convert", "org/tiny-dense", str(out), "-e", "4", "-k", "2",
                                      "--push-to-hub", "tester/tiny-dense-moe"])
    assert result.exit_code == 0, result.output
    assert "verification: exact" in result.output and "pushed" in result.output
    downloaded = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in hub.requests("GET", "/resolve/")}
    assert "training_state.bin" not in downloaded and "model.safetensors" in downloaded

    remote = hub.files("tester/tiny-dense-moe")
    assert all(remote[name] == data for name, data in _local_files(out).items())
    card = ModelCard(remote["README.md"].decode())
    assert card.data.base_model == "org/tiny-dense" and card.data.base_model_relation == "finetune"
    assert card.data.license == "other" and card.data.license_name == "tiny-license"
    assert {"moe", "upcycled"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert 'from_pretrained("tester/tiny-dense-moe"' in card.text and "trust_remote_code" not in card.text
    recipe = read_json(out / "upcycle_recipe.json")["upcycle"]
    assert recipe["source"] == "org/tiny-dense" and len(recipe["source_commit"]) == 40
    measured = recipe["verification"]["max_abs_logit_diff"]
    assert recipe["verification"]["passed"] and measured <= EXACT_ATOL
    assert f"max |Δlogit| = {measured:.3g}" in card.text

    requests_so_far = len(hub.log)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = tmp_path / "moe-offline"
    result = CliRunner().invoke(cli, ["convert", "org/tiny-dense", str(again), "-e", "4", "-k", "2", "-q",
                                      "--no-verify"])
    assert result.exit_code == 0, result.output
    assert len(hub.log) == requests_so_far  # served from the cache, not the network
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "org/never-downloaded", str(tmp_path / "x")]))
    assert "not in the local Hugging Face cache" in line


def test_hub_source_download_shows_progress(hub, tmp_path, capfd):
    dense = make_dense("llama", tmp_path / "dense")
    _publish_dense(hub, dense, "org/progress")
    from upcycle.io.hub import download

    folder = download("org/progress")
    assert (folder / "model.safetensors").is_file()
    assert "Fetching" in capfd.readouterr().err


def test_convert_push_to_hub_checks_token_before_converting(hub, tmp_path, monkeypatch):
    dense = make_dense("llama", tmp_path / "dense")
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "moe"
    line = _one_line_error(CliRunner().invoke(cli, ["convert", str(dense), str(out), "--push-to-hub", "tester/x"]))
    assert "no Hugging Face token" in line
    assert not out.exists() and hub.log == []


def test_push_cli_in_a_subprocess_honours_hf_endpoint(hub, moe, tmp_path):
    """No in-process patching: HF_ENDPOINT, HF_TOKEN and HF_HUB_DISABLE_XET from the environment only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "upcycle", "push", str(moe), "tester/sub", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert all(hub.files("tester/sub")[name] == data for name, data in _local_files(moe).items())
    bad = subprocess.run([sys.executable, "-m", "upcycle", "push", str(moe), "tester/sub", "--token", "hf_bad", "-q"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_hub_card_metadata_choices():
    from upcycle.card import base_model_relation, render_card, verification_text

    summary = {"target": "bundled", "architecture": "UpcycledMoeForCausalLM", "exact": False, "method": "drop",
               "num_experts": 8, "expert_size": 64, "dense_ffn_size": 128, "top_k": 2, "moe_layers": [1, 3],
               "num_layers": 4, "total_params": 2_500_000, "active_params": 1_000_000}
    assert base_model_relation("a/b") == "finetune" and base_model_relation(["a/b", "c/d"]) == "merge"
    assert base_model_relation(None) is None
    measured = {"max_abs_logit_diff": 0.731, "mean_kl": 0.0123, "greedy_match": 0.5, "dtype": "float32",
                "num_prompts": 4, "max_new_tokens": 0, "atol": 1e-3}
    card = render_card(summary, {"method": "drop"}, ["a/b", "c/d"], verification=measured, remote_code=True,
                       license_info={"license": "apache-2.0"})
    assert card.data.base_model_relation == "merge" and card.data.license == "apache-2.0"
    assert "trust_remote_code=True" in card.text and "not exact by design" in card.text and "0.731" in card.text
    assert "not run at conversion time (disabled with --no-verify)" in verification_text(
        {"skipped": "disabled with --no-verify"}, True)


def test_push_uses_upload_large_folder_over_the_threshold_when_the_client_has_it(hub, moe, monkeypatch):
    """huggingface_hub 1.x had the resumable ``upload_large_folder``; 2.x folded resuming into upload_folder."""
    from huggingface_hub import HfApi

    calls = []

    def upload_large_folder(self, repo_id, folder_path, repo_type=None, revision=None, private=None,
                            ignore_patterns=None):
        calls.append((repo_id, repo_type, revision))
        self.upload_folder(repo_id=repo_id, folder_path=folder_path, revision=revision, ignore_patterns=ignore_patterns)

    monkeypatch.setattr(HfApi, "upload_large_folder", upload_large_folder, raising=False)
    import upcycle

    upcycle.push(moe, "tester/large", quiet=True, large_threshold="200MB")
    assert calls == []
    result = upcycle.push(moe, "tester/large", quiet=True, large_threshold="100KB")
    assert calls == [("tester/large", "model", None)] and result.commit_url is None


def test_convert_push_to_hub_failure_keeps_the_output_and_says_how_to_finish(hub, tmp_path):
    dense = make_dense("llama", tmp_path / "dense")
    hub.faults.append(Fault("POST", r"/commit/main$", 503, count=99))
    out = tmp_path / "moe"
    line = _one_line_error(CliRunner().invoke(cli, ["convert", str(dense), str(out), "--push-to-hub", "tester/later",
                                                    "-q", "--no-verify"]))
    assert f"converted to {out}, but push to tester/later did not complete" in line
    assert f"`upcycle push {out} tester/later`" in line
    assert (out / "upcycle_recipe.json").is_file()
    hub.faults.clear()
    result = CliRunner().invoke(cli, ["push", str(out), "tester/later", "-q"])
    assert result.exit_code == 0, result.output


def test_hub_dry_run_reads_headers_by_range_and_no_weights(hub, tmp_path):
    dense = make_dense("llama", tmp_path / "dense")
    _publish_dense(hub, dense, "org/headers-only")
    result = CliRunner().invoke(cli, ["convert", "org/headers-only", str(tmp_path / "x"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert '"dry_run": true' in result.output and not (tmp_path / "x").exists()
    weight_reads = hub.requests("GET", r"/resolve/.*\.safetensors$")
    assert weight_reads and len(weight_reads) == len([p for p in hub.ranged if p.endswith(".safetensors")])
