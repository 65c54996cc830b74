"""Benchmark: streamed ``merge_lora`` vs the naive peft merge, peak RSS and wall time.

Generates a ~750M-parameter fp32 Llama-shaped model with random weights (written tensor by tensor, so the
generator itself never holds the model) and an all-linear r=16 adapter, then runs, each in its own subprocess so
peaks do not mix:

  (a) ``axlora.merge.merge_lora(base, adapter, out)``
  (b) ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload()`` +
      ``save_pretrained``

Peak RSS is the child's own high-water mark (VmHWM from /proc/self/status, read inside each child at the end;
it includes the interpreter and the torch import); wall time is measured around the work inside the child and
for the whole child.
Finally both outputs are compared tensor by tensor (largest absolute difference).

    python bench/merge.py --workdir /tmp/axlora-bench-merge [--json figures.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Shape tuned to ~750M parameters (749.4M): 24 layers, hidden 1536, 12 heads / 6 KV heads, MLP 4352, vocab 32000.
SHAPE = {"hidden": 1536, "layers": 24, "heads": 12, "kv_heads": 6, "intermediate": 4352, "vocab": 32000}
SMALL_SHAPE = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 1000}
RANK, ALPHA = 16, 32
SHARD_BYTES = 200 * 1024**2
OUTPUT_SHARD = 2 * 1024**3


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM where /proc exists, else ru_maxrss.

    On Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``exec``: a child started by a parent holding
    500 MB reports at least 500 MB even if it never uses that much. VmHWM belongs to the current address space
    only, so it measures the child alone. (The parent also stays small: generation runs in its own child.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _tensor_shapes(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Llama checkpoint layout, in the order transformers writes it."""
    h, kv = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (s["intermediate"], h)),
                   (p + "mlp.up_proj.weight", (s["intermediate"], h)),
                   (p + "mlp.down_proj.weight", (h, s["intermediate"]))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def generate_base(directory: Path, s: dict[str, int]) -> int:
    """Write the random base shard by shard (one tensor in memory at a time); returns the parameter count."""
    import torch
    from transformers import LlamaConfig

    from axlora.merge.safetensors_io import PlannedTensor, ShardWriter, plan_shards

    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"], vocab_size=s["vocab"],
                tie_word_embeddings=False, dtype="float32").save_pretrained(directory)
    shapes = dict(_tensor_shapes(s))
    groups = plan_shards([PlannedTensor(n, "F32", shape) for n, shape in shapes.items()], SHARD_BYTES)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(directory / name, group)
        for t in group:
            value = torch.ones(t.shape) if len(t.shape) == 1 else torch.randn(t.shape, generator=gen).mul_(0.02)
            writer.write_tensor(t.name, value)
            weight_map[t.name] = name
            total += t.nbytes
            del value
        writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(math.prod(shape) for shape in shapes.values())


def generate_adapter(directory: Path, s: dict[str, int]) -> int:
    """An all-linear r=16 adapter in peft's saved layout (non-zero B); returns its parameter count."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM").save_pretrained(directory)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in _tensor_shapes(s):
        if len(shape) != 2 or not name.startswith("model.layers."):
            continue  # all-linear skips the embedding and lm_head
        module = "base_model.model." + name.removesuffix(".weight")
        out_f, in_f = shape
        tensors[f"{module}.lora_A.weight"] = (torch.rand(RANK, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.01
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def child_generate(base: Path, adapter: Path, size: Path) -> dict[str, float]:
    """Generate the model (unless already there, e.g. with --keep) and the adapter, in a child of its own."""
    shape = SMALL_SHAPE if str(size) == "small" else SHAPE
    if (base / "model.safetensors.index.json").exists():
        params = sum(math.prod(s) for _, s in _tensor_shapes(shape))
    else:
        params = generate_base(base, shape)
    return {"params": params, "adapter_params": generate_adapter(adapter, shape), "peak_rss": _peak_rss_bytes()}


def child_ours(base: Path, adapter: Path, out: Path) -> dict[str, float]:
    from axlora.merge import merge_lora

    start = time.monotonic()
    report = merge_lora(base, adapter, out, max_shard_size=OUTPUT_SHARD, log=lambda m: print(m, file=sys.stderr))
    return {"seconds": time.monotonic() - start, "peak_rss": _peak_rss_bytes(),
            "max_verify_error": report.max_verify_error or 0.0, "merged_modules": report.merged_modules}


def child_naive(base: Path, adapter: Path, out: Path) -> dict[str, float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    loaded = sum(bool(p.abs().sum() > 0) for n, p in model.named_parameters() if "lora_B" in n)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, max_shard_size=OUTPUT_SHARD)
    return {"seconds": time.monotonic() - start, "peak_rss": _peak_rss_bytes(), "merged_modules": loaded}


def compare_outputs(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference between the two merged models, one tensor at a time."""
    from safetensors import safe_open

    def locations(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.exists():
            return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), d / "model.safetensors")

    la, lb = locations(a), locations(b)
    if set(la) != set(lb):
        raise SystemExit(f"outputs hold different tensors: {sorted(set(la) ^ set(lb))[:5]}")
    worst = 0.0
    for name in la:
        with safe_open(la[name], "pt") as fa, safe_open(lb[name], "pt") as fb:
            worst = max(worst, float((fa.get_tensor(name) - fb.get_tensor(name)).abs().max()))
    return {"tensors": len(la), "max_abs_diff": worst}


def _run_child(kind: str, base: Path, adapter: Path, out: Path) -> dict[str, float]:
    """Run one measurement in a fresh interpreter; its last stdout line is its JSON result."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)],
                          stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - start
    return result


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the model, adapter and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the workdir's generated model and outputs")
    parser.add_argument("--small", action="store_true", help="a tiny model, to smoke-test the script itself")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, base, adapter, out = args.child
        fn = {"ours": child_ours, "naive": child_naive, "compare": lambda b, _a, o: compare_outputs(b, o),
              "generate": child_generate}[kind]
        print(json.dumps(fn(Path(base), Path(adapter), Path(out))))
        return

    shape = SMALL_SHAPE if args.small else SHAPE
    work = args.workdir or Path(tempfile.mkdtemp(prefix="axlora-bench-merge-"))
    base, adapter = work / "base", work / "adapter"
    ours_out, naive_out = work / "merged-axlora", work / "merged-naive"
    gen = _run_child("generate", base, adapter, Path("small" if args.small else "full"))
    params, adapter_params = gen["params"], gen["adapter_params"]
    print(f"base: {params / 1e6:.1f}M params, {_dir_size(base) / 1e9:.2f} GB fp32 in "
          f"{len(list(base.glob('*.safetensors')))} shards; adapter: all-linear r={RANK}, "
          f"{adapter_params / 1e6:.1f}M params (generated in {gen['process_seconds']:.0f}s, "
          f"generator peak RSS {gen['peak_rss'] / 2**30:.2f} GiB)")
    for d in (ours_out, naive_out):
        shutil.rmtree(d, ignore_errors=True)
    load_before = os.getloadavg()
    naive = _run_child("naive", base, adapter, naive_out)
    ours = _run_child("ours", base, adapter, ours_out)
    load_after = os.getloadavg()
    diff = _run_child("compare", ours_out, adapter, naive_out)
    ratio = ours["peak_rss"] / naive["peak_rss"]

    print(f"\n{'method':<44}{'peak RSS':>12}{'merge s':>10}{'process s':>11}")
    for label, r in (("axlora merge_lora (streamed, verified)", ours),
                     ("peft merge_and_unload + save_pretrained", naive)):
        print(f"{label:<44}{r['peak_rss'] / 2**30:>9.2f} GiB{r['seconds']:>10.1f}{r['process_seconds']:>11.1f}")
    print(f"\npeak RSS ratio (axlora / naive): {ratio:.3f}  (goal <= 0.3)")
    print(f"merged modules: axlora {ours['merged_modules']}, naive {naive['merged_modules']}; "
          f"largest verify error {ours['max_verify_error']:.2e}")
    print(f"outputs agree: {diff['tensors']} tensors, largest absolute difference {diff['max_abs_diff']:.2e}")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before[0]:.1f} before / "
          f"{load_after[0]:.1f} after the timed runs (other work on the machine slows both methods)")
    figures = {"shape": shape, "params": params, "adapter_params": adapter_params, "rank": RANK,
               "base_bytes": _dir_size(base), "ours": ours, "naive": naive, "ratio": ratio, "compare": diff,
               "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.keep:
        shutil.rmtree(work if args.workdir is None else ours_out, ignore_errors=True)
        if args.workdir is not None:
            shutil.rmtree(naive_out, ignore_errors=True)


if __name__ == "__main__":
    main()
