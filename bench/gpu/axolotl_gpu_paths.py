"""The Axolotl-config paths that need a CUDA GPU, each checked with a real `axlora train` on a tiny model.

    python bench/gpu/axolotl_gpu_paths.py [--workdir DIR] [--json OUT]

Each check trains 3 steps on a tiny random model built from its real config class (no download) and compares
the step-1 loss (before any update, so it depends only on the forward) with the same run without the feature:

- qlora:           adapter: qlora on a CUDA GPU (bitsandbytes' CUDA kernels), loss within NF4 rounding
- moe_experts:     quantize_moe_experts on a Qwen3-MoE (experts in NF4), loss within NF4 rounding
- offload:         gradient_checkpointing: offload (activations in pinned CPU memory), the same losses
- liger:           liger_rope / liger_rms_norm / liger_glu_activation / liger_fused_linear_cross_entropy
- cut_ce:          cut_cross_entropy (CutCrossEntropyPlugin)
- fsdp_qlora:      fsdp with a 4-bit base on 2 GPUs (skipped with fewer)
- fsdp_8bit:       fsdp with an 8-bit base (int8 weights whole on each GPU) on 2 GPUs, loss within int8 rounding

On a CPU, qlora, moe_experts and offload run too (bitsandbytes has a CPU backend). A check whose package or
GPUs are missing reports "skipped" with the reason (the run itself says which line it
printed instead). Exit status 1 when a check that ran failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CHECKS = {
    "qlora": ({"adapter": "qlora"}, [], 0.05),
    "moe_experts": ({"adapter": "qlora", "quantize_moe_experts": True}, [], 0.05),
    "offload": ({"gradient_checkpointing": "offload"}, [], 1e-5),
    "liger": ({"liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True,
               "liger_fused_linear_cross_entropy": True}, ["liger_kernel"], 0.02),
    "cut_ce": ({"cut_cross_entropy": True}, ["cut_cross_entropy"], 0.02),
    "fsdp_qlora": ({"adapter": "qlora", "num_processes": 2, "fsdp": ["full_shard", "auto_wrap"],
                    "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Qwen3MoeDecoderLayer"}}, [], 0.05),
    "fsdp_8bit": ({"load_in_8bit": True, "num_processes": 2, "fsdp": ["full_shard", "auto_wrap"],
                   "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Qwen3MoeDecoderLayer"}}, [], 0.05),
}


def build_models(root: Path) -> Path:
    """A 64-wide Qwen3-MoE (bitsandbytes quantizes blocks of 64) with axlora's tiny tokenizer, and its data."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from axlora.data.demo_rows import addition_rows, write_jsonl
    from axlora.model.builtin import train_tiny_tokenizer

    target = root / "qwen3_moe"
    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    write_jsonl(addition_rows(64, seed=3), root / "rows.jsonl")
    return target


def first_loss(root: Path, name: str, base: Path, keys: dict) -> tuple[int, float | None, str]:
    """Train 3 steps with ``keys``; the exit status, the step-1 loss and the output's tail."""
    out = root / name
    config = {"base_model": str(base), "datasets": [{"path": str(root / "rows.jsonl"), "type": "alpaca"}],
              "sequence_len": 96, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
              "micro_batch_size": 4, "max_steps": 3, "logging_steps": 1, "bf16": False, "output_dir": str(out),
              **keys}
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "axlora", "train", str(path)], capture_output=True, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    loss = json.loads(metrics.read_text().splitlines()[0])["loss"] if done.returncode == 0 else None
    return done.returncode, loss, (done.stdout + done.stderr)[-1500:]


def skip_reason(name: str, packages: list[str]) -> str | None:
    import torch

    if not torch.cuda.is_available() and name in ("liger", "cut_ce", "fsdp_qlora", "fsdp_8bit"):
        return "no CUDA GPU"  # the others run on a CPU too (bitsandbytes' CPU backend), which checks this script
    if name.startswith("fsdp") and torch.cuda.device_count() < 2:
        return "needs 2 GPUs"
    missing = [p for p in packages + ["bitsandbytes"] * name.startswith(("qlora", "moe", "fsdp"))
               if importlib.util.find_spec(p) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="axlora-gpu-paths-"))
    root.mkdir(parents=True, exist_ok=True)
    base = build_models(root)
    status, reference, tail = first_loss(root, "plain", base, {})
    if status != 0:
        print(tail)
        return 1
    results, failed = {}, False
    for name, (keys, packages, tolerance) in CHECKS.items():
        reason = skip_reason(name, packages)
        if reason:
            results[name] = {"result": "skipped", "why": reason}
        else:
            status, loss, tail = first_loss(root, name, base, keys)
            ok = status == 0 and loss is not None and abs(loss - reference) <= tolerance * abs(reference)
            failed |= not ok
            results[name] = {"result": "ok" if ok else "failed", "loss": loss, "plain_loss": reference,
                             **({} if ok else {"output": tail})}
        print(f"{name:12s} {results[name]['result']:8s} {results[name].get('why', results[name].get('loss'))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
