"""Conversion speed and memory against the disk floor (issue 2).

Creates a synthetic bf16 Llama checkpoint (random values; TinyLlama-1.1B shapes by default) one layer
at a time, converts it to 8 experts top-2 with ``python -m upcycle convert`` in a subprocess, and
measures in the same run:

* wall time and peak RSS of the conversion process (``getrusage`` in a tiny launcher process,
  cross-checked by psutil polling of the process tree);
* the disk floor: the time ``dd if=/dev/zero of=FILE bs=16M count=N conv=fsync`` takes to write the
  same number of bytes to the same file system (measured before and after every conversion);
* ``python -m upcycle --help`` start-up time (median of several runs).

Targets: wall time <= 1.3x the ``dd oflag=direct`` time (issue 11) and <= 1.5x the
``dd conv=fsync`` time (issue 2), peak RSS <= 1.5 GB, ``--help`` < 1.5 s.

    python benchmarks/convert_synthetic.py --runs 3 --cleanup

Prints one JSON object per conversion run and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from upcycle.io.safetensors_format import TensorSpec, encode_header, numel, write_tensor_bytes  # noqa: E402
from results import write_result  # noqa: E402

DD_BLOCK = 16 * 1024 * 1024
TARGET_WALL_RATIO = 1.5
TARGET_DIRECT_RATIO = 1.3  # issue 11: against dd oflag=direct
TARGET_RSS_BYTES = 1.5e9
TARGET_HELP_S = 1.5


def llama_config(args: argparse.Namespace) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def layer_specs(args: argparse.Namespace, i: int) -> list[TensorSpec]:
    h, f, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    p = f"model.layers.{i}."
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    return [TensorSpec(p + k, s, torch.bfloat16) for k, s in shapes.items()]


def write_synthetic(folder: Path, args: argparse.Namespace) -> int:
    """A sharded bf16 Llama checkpoint written one shard (one layer) at a time; returns its parameters."""
    config = json.dumps(llama_config(args), indent=2)
    done = folder / "model.safetensors.index.json"
    if done.is_file() and (folder / "config.json").read_text() == config:  # same shapes: reuse (same seed)
        return sum(numel(s) for s in json.loads(done.read_text())["shapes"].values())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config)
    h = args.hidden
    groups = [[TensorSpec("model.embed_tokens.weight", (args.vocab, h), torch.bfloat16)]]
    groups += [layer_specs(args, i) for i in range(args.layers)]
    groups += [[TensorSpec("model.norm.weight", (h,), torch.bfloat16),
                TensorSpec("lm_head.weight", (args.vocab, h), torch.bfloat16)]]
    gen = torch.Generator().manual_seed(0)
    weight_map, total, params = {}, 0, 0
    for n, specs in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(folder / name, "wb") as f:
            f.write(encode_header(specs, {"format": "pt"}))
            for spec in specs:
                if len(spec.shape) == 1:
                    tensor = (1.0 + 0.1 * torch.randn(spec.shape, generator=gen)).to(spec.dtype)
                else:
                    tensor = (0.02 * torch.randn(spec.shape, generator=gen)).to(spec.dtype)
                write_tensor_bytes(f, spec, tensor)
                weight_map[spec.name] = name
                total += spec.nbytes
                params += tensor.numel()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map,
             "shapes": {s.name: list(s.shape) for g in groups for s in g}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params


def dd_floor(folder: Path, nbytes: int, flag: str = "conv=fsync") -> float:
    """Seconds ``dd ... FLAG`` needs to write ``nbytes`` (rounded up to 16 MiB blocks).

    ``conv=fsync`` writes through the page cache (not a floor: the kernel throttles dirty pages);
    ``oflag=direct`` writes straight to the disk, the real floor for a sequential writer.
    """
    target = folder / "dd-floor.bin"
    count = math.ceil(nbytes / DD_BLOCK)
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", flag],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


class TreeRssPoller(threading.Thread):
    """Polls the summed RSS of a process and its children (a cross-check of the rusage peak)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._done = pid, interval, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._done.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


# Peak RSS comes from a tiny launcher's RUSAGE_CHILDREN: the kernel's max-RSS of a child forked straight
# from this (large) benchmark process would include this process's own RSS at the moment of exec.
LAUNCHER = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "open(sys.argv[1], 'w').write(json.dumps([rc, u.ru_maxrss, u.ru_utime, u.ru_stime]))")


def run_conversion(source: Path, output: Path, experts: int, top_k: int, verify: bool = False) -> dict:
    """Run ``python -m upcycle convert`` and return wall time, peak RSS, CPU seconds and output bytes.

    Without ``verify`` the conversion runs with ``--no-verify``: the writing alone, which the disk floors
    measure. With it, the default conversion, which also computes the streamed verification certificate.
    """
    cmd = [sys.executable, "-m", "upcycle", "convert", str(source), str(output), "--num-experts", str(experts),
           "--top-k", str(top_k), "--quiet", "--force", *([] if verify else ["--no-verify"])]
    usage_file = output.parent / "rusage.json"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *cmd], cwd=REPO,
                            stdout=subprocess.DEVNULL)
    poller = None
    try:
        import psutil  # noqa: F401

        poller = TreeRssPoller(proc.pid)
        poller.start()
    except ImportError:
        pass
    proc.wait()
    wall = time.perf_counter() - start
    if poller is not None:
        poller.stop()
    rc, maxrss_kb, user_s, sys_s = json.loads(usage_file.read_text())
    usage_file.unlink()
    if rc != 0:
        raise SystemExit(f"conversion failed with exit code {rc}: {' '.join(cmd)}")
    out_bytes = sum(p.stat().st_size for p in output.iterdir() if p.name.endswith(".safetensors"))
    return {"wall_s": wall, "peak_rss_bytes": maxrss_kb * 1024, "user_s": user_s, "sys_s": sys_s,
            "polled_tree_rss_bytes": poller.peak if poller else None, "output_bytes": out_bytes,
            "command": " ".join(cmd[1:])}


def planned_output_bytes(source: Path, experts: int, top_k: int) -> int:
    """The output size the conversion plans (``--dry-run --json``), so dd can run before it."""
    cmd = [sys.executable, "-m", "upcycle", "convert", str(source), str(source.parent / "unused"), "--num-experts",
           str(experts), "--top-k", str(top_k), "--dry-run", "--json", "--quiet"]
    return json.loads(subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout)["output_bytes"]


def help_startup(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "upcycle", "--help"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def machine() -> dict:
    total = shutil.disk_usage("/").total
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "root_disk_bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/benchdata"), help="scratch folder")
    ap.add_argument("--runs", type=int, default=1, help="conversions to time (each with its own dd floor)")
    ap.add_argument("--help-runs", type=int, default=7, help="upcycle --help start-ups to time")
    ap.add_argument("--cleanup", action="store_true", help="delete the scratch folder at the end")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--certificate", action="store_true",
                    help="also time one default conversion (with the streamed verification certificate)")
    ap.add_argument("--json-out", type=Path, help="also write the results here")
    ap.add_argument("--no-results", dest="results", action="store_false",
                    help="do not write benchmarks/results/convert_synthetic-COMMIT.json (the docs are rendered from it)")
    args = ap.parse_args()

    source, output = args.workdir / "dense", args.workdir / "moe"
    load_start = os.getloadavg()[0]
    print(f"free disk under {args.workdir.parent}: {shutil.disk_usage(args.workdir.parent).free / 1e9:.1f} GB",
          file=sys.stderr)
    help_times = help_startup(args.help_runs)
    start = time.perf_counter()
    params = write_synthetic(source, args)
    print(f"synthetic source: {params / 1e9:.3f}B parameters in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    planned = planned_output_bytes(source, args.experts, args.top_k)
    rows, certified = [], None
    try:
        for run in range(args.runs):
            shutil.rmtree(output, ignore_errors=True)
            dd_before = dd_floor(args.workdir, planned)
            direct_before = dd_floor(args.workdir, planned, "oflag=direct")
            conv = run_conversion(source, output, args.experts, args.top_k)
            shutil.rmtree(output)
            direct_after = dd_floor(args.workdir, planned, "oflag=direct")
            dd_after = dd_floor(args.workdir, planned)
            floor = (dd_before + dd_after) / 2
            direct = (direct_before + direct_after) / 2
            row = {"run": run + 1, "source_params": params, **conv, "dd_before_s": dd_before, "dd_after_s": dd_after,
                   "dd_floor_s": floor, "wall_over_floor": conv["wall_s"] / floor,
                   "direct_before_s": direct_before, "direct_after_s": direct_after, "direct_floor_s": direct,
                   "wall_over_direct": conv["wall_s"] / direct,
                   "meets_direct_target": conv["wall_s"] <= TARGET_DIRECT_RATIO * direct,
                   "meets_wall_target": conv["wall_s"] <= TARGET_WALL_RATIO * floor,
                   "meets_rss_target": conv["peak_rss_bytes"] <= TARGET_RSS_BYTES}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if args.certificate:  # the default conversion: writing plus the streamed verification certificate
            shutil.rmtree(output, ignore_errors=True)
            certified = run_conversion(source, output, args.experts, args.top_k, verify=True)
            certificate = json.loads((output / "upcycle_recipe.json").read_text())["upcycle"].get("verification")
            certified["certificate"] = certificate
            print(json.dumps(certified), flush=True)
            shutil.rmtree(output)
    finally:
        if args.cleanup:
            shutil.rmtree(args.workdir, ignore_errors=True)

    summary = {"machine": machine(), "help_s": help_times, "help_median_s": statistics.median(help_times),
               "meets_help_target": statistics.median(help_times) < TARGET_HELP_S, "runs": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))
    if args.results:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings["command"] = "python benchmarks/convert_synthetic.py " + " ".join(sys.argv[1:])
        print(write_result("convert_synthetic", settings, {
            "runs": rows, "with_certificate": certified, "help_median_s": summary["help_median_s"], "help_min_s": min(help_times),
            "help_max_s": max(help_times), "help_runs": len(help_times),
            "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)]}), file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    print("\n| run | output | wall | user / sys CPU | dd oflag=direct (before / after) | wall / direct | "
          "dd conv=fsync (before / after) | wall / fsync | peak RSS (rusage) | tree RSS (polled) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        polled = f"{r['polled_tree_rss_bytes'] / 1e9:.2f} GB" if r["polled_tree_rss_bytes"] else "n/a"
        print(f"| {r['run']} | {r['output_bytes'] / 1e9:.2f} GB | {r['wall_s']:.1f} s | {r['user_s']:.1f} / "
              f"{r['sys_s']:.1f} s | {r['direct_floor_s']:.1f} s ({r['direct_before_s']:.1f} / "
              f"{r['direct_after_s']:.1f}) | {r['wall_over_direct']:.2f}x | {r['dd_floor_s']:.1f} s "
              f"({r['dd_before_s']:.1f} / {r['dd_after_s']:.1f}) | {r['wall_over_floor']:.2f}x | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {polled} |")
    print(f"\n`upcycle --help` start-up: median {summary['help_median_s']:.2f} s over {len(help_times)} runs "
          f"(min {min(help_times):.2f}, max {max(help_times):.2f})")


if __name__ == "__main__":
    main()
