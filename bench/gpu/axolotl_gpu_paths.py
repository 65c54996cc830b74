"""The Axolotl-config paths that need a CUDA GPU, each checked with a real `axlora train` on a tiny model.

    python bench/gpu/axolotl_gpu_paths.py [--workdir DIR] [--json OUT] [--only NAME ...]

Two tiny models are built from their real config classes (no download), with axlora's tiny tokenizer: a 64-wide
Qwen3-MoE (4 experts, top 2; bitsandbytes quantizes blocks of 64) and a 128-wide dense Qwen3 (torchao's int8
groups 128 inputs). Each is first fitted to the rows for 40 full-model steps: a random model's loss stays at
ln(vocab) whatever its weights are, so a broken path would pass any tolerance. Each check trains 3 steps (ReLoRA
5) and compares its losses with a reference run on the same base: by default the plain run and its step-1 loss
only (before any update, so it depends only on the forward). Tolerances are relative.

- qlora:           adapter: qlora (bitsandbytes' 4-bit kernels); step-1 loss within 5% (NF4 rounding) of plain
- moe_experts:     quantize_moe_experts on the Qwen3-MoE (experts in NF4); step-1 loss within 5% of plain
- offload:         gradient_checkpointing: offload (activations in pinned CPU memory); step-1 loss within 1e-5
- liger:           liger_rope / liger_rms_norm / liger_glu_activation / liger_fused_linear_cross_entropy; 2%
- cut_ce:          cut_cross_entropy (CutCrossEntropyPlugin); 2%
- fsdp_qlora:      fsdp with a 4-bit base on 2 processes of micro batch 2 against adapter: qlora on one process
                   of micro batch 4 (the same rows): every step's loss within 1e-3
- fsdp_8bit:       fsdp with an 8-bit base (int8 weights whole on each process), likewise against load_in_8bit
                   on one process: every step's loss within 1e-3
- relora_4bit:     ReLoRA on a 4-bit base (relora_steps 2, 5 steps; each restart dequantizes, merges and
                   requantizes the NF4 weights): every loss finite and the restarts after steps 2 and 4 logged
- loftq:           peft: {loftq_config: {loftq_bits: 4}} (peft's own loftq_init on CUDA): step-1 loss within
                   qlora's 5% of plain (lora_alpha = lora_r, so the LoRA adds the residual at scale 1)
- torchao_int8, torchao_fp8, torchao_nf4, torchao_nvfp4:
                   model_quantization_config: {backend: torchao, weight_dtype: ...}: step-1 loss within 2% (8-bit
                   formats) or 5% (4-bit) of plain
- torchao_int4:    weight_dtype int4 must stop before training with exit status 2 naming the key: "refused"
- expert_parallel: expert_parallel_size 2 on 2 processes (NCCL on GPUs) in bf16 against the same 2-process
                   DDP run without it: every step's loss within 1e-3

ReLoRA, LoftQ and torchao run on the dense model, the rest on the MoE. liger and cut_ce need a CUDA GPU. The
2-process checks need 2 GPUs on a CUDA machine; without CUDA they run as 2 CPU processes over gloo, and the rest
on the CPU too (bitsandbytes and torchao have CPU backends; LoftQ then runs axlora's CPU twin of peft's routine),
which checks the script itself. A check whose package or GPUs are missing reports "skipped" with the reason.
Each run's config and whole output stay in the workdir (NAME.yml, NAME.log). Exit status 1 when a check that
ran failed; "refused" is torchao_int4's expected outcome, not a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import yaml

FOUR_BIT_TOLERANCE = 0.05
"""How far a 4-bit base's step-1 loss may be from the full-precision one (NF4 in blocks of 64, NVFP4)."""
EIGHT_BIT_TOLERANCE = 0.02
"""The same for 8-bit weights (int8, fp8)."""
WARM_UP_STEPS = 40
"""Full-model steps on the rows before a base is saved (see ``warm_up``)."""
SAME_RUN_TOLERANCE = 1e-3
"""Two ways of running the same computation (sharded or not, experts split or not): every step's loss."""


class Check(NamedTuple):
    """One path: its keys, the packages it needs, its relative tolerance, and how it is judged."""

    keys: dict
    packages: list[str]
    tolerance: float
    base: str = "moe"  # which built model: "moe" (Qwen3-MoE) or "dense" (Qwen3)
    reference: dict = {}  # the keys of the run it is compared with ({}: the plain run)
    judge: str = "first"  # "first": step-1 loss; "all": every step's loss; "restarts": ReLoRA; "refused": exit 2
    cuda_only: bool = False


def _torchao(dtype: str) -> dict:
    return {"model_quantization_config": {"backend": "torchao", "weight_dtype": dtype}}


def _fsdp(quantization: dict) -> Check:
    """FSDP over 2 processes of micro batch 2 sees the rows one process of micro batch 4 sees."""
    keys = {**quantization, "num_processes": 2, "micro_batch_size": 2, "fsdp": ["full_shard", "auto_wrap"],
            "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Qwen3MoeDecoderLayer"}}
    return Check(keys, ["bitsandbytes"], SAME_RUN_TOLERANCE, reference=quantization, judge="all")


# expert parallelism keeps the experts frozen: LoRA on the attention only (lora_target_linear adapts the experts)
_DDP_BF16 = {"num_processes": 2, "micro_batch_size": 2, "bf16": True, "lora_target_linear": False,
             "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

CHECKS = {
    "qlora": Check({"adapter": "qlora"}, ["bitsandbytes"], FOUR_BIT_TOLERANCE),
    "moe_experts": Check({"adapter": "qlora", "quantize_moe_experts": True}, ["bitsandbytes"], FOUR_BIT_TOLERANCE),
    "offload": Check({"gradient_checkpointing": "offload"}, [], 1e-5),
    "liger": Check({"liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True,
                    "liger_fused_linear_cross_entropy": True}, ["liger_kernel"], 0.02, cuda_only=True),
    "cut_ce": Check({"cut_cross_entropy": True}, ["cut_cross_entropy"], 0.02, cuda_only=True),
    "fsdp_qlora": _fsdp({"adapter": "qlora"}),
    "fsdp_8bit": _fsdp({"load_in_8bit": True}),
    "relora_4bit": Check({"adapter": "qlora", "relora_steps": 2, "relora_warmup_steps": 1, "max_steps": 5,
                          "optimizer": "adamw_torch"}, ["bitsandbytes"], 0, base="dense", judge="restarts"),
    "loftq": Check({"peft": {"loftq_config": {"loftq_bits": 4}}, "lora_alpha": 4}, ["bitsandbytes"], FOUR_BIT_TOLERANCE,
                   base="dense"),
    "torchao_int8": Check(_torchao("int8"), ["torchao"], EIGHT_BIT_TOLERANCE, base="dense"),
    "torchao_nf4": Check(_torchao("nf4"), ["torchao"], FOUR_BIT_TOLERANCE, base="dense"),
    "torchao_fp8": Check(_torchao("fp8"), ["torchao"], EIGHT_BIT_TOLERANCE, base="dense"),
    "torchao_nvfp4": Check(_torchao("nvfp4"), ["torchao"], FOUR_BIT_TOLERANCE, base="dense"),
    "torchao_int4": Check(_torchao("int4"), [], 0, base="dense", judge="refused"),
    "expert_parallel": Check({**_DDP_BF16, "expert_parallel_size": 2}, [], SAME_RUN_TOLERANCE, reference=_DDP_BF16,
                             judge="all"),
}


class Run(NamedTuple):
    status: int
    losses: list[float]
    output: str


def build_models(root: Path) -> dict[str, Path]:
    """A 64-wide Qwen3-MoE (bitsandbytes quantizes blocks of 64) and a 128-wide dense Qwen3, and the data."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    from axlora.data.demo_rows import addition_rows, write_jsonl
    from axlora.data.formats import alpaca_prompt
    from axlora.model.builtin import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    configs = {
        "moe": Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                              decoder_sparse_step=1, max_position_embeddings=256),
        "dense": Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256),
    }
    rows = addition_rows(64, seed=3)
    texts = [alpaca_prompt(row["instruction"], row["input"]) + row["output"] + tokenizer.eos_token for row in rows]
    bases = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        bases[name] = root / {"moe": "qwen3_moe", "dense": "qwen3"}[name]
        model = AutoModelForCausalLM.from_config(config)
        warm_up(model, tokenizer(texts, return_tensors="pt", padding=True))
        model.save_pretrained(bases[name])
        tokenizer.save_pretrained(bases[name])
    write_jsonl(rows, root / "rows.jsonl")
    return bases


def warm_up(model, batch, steps: int = WARM_UP_STEPS) -> None:
    """Fit the model to the rows first: a random model's loss sits at ln(vocab) whatever its weights are (zeroing
    every linear layer moves it by 0.2%), so a broken path would pass any tolerance; a fitted one's does not."""
    import torch

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def train(root: Path, name: str, base: Path, keys: dict) -> Run:
    """Train 3 steps (unless ``keys`` say otherwise) with ``keys``: the exit status, every step's loss, the output."""
    out = root / name
    config = {"base_model": str(base), "datasets": [{"path": str(root / "rows.jsonl"), "type": "alpaca"}],
              "sequence_len": 96, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
              "micro_batch_size": 4, "max_steps": 3, "logging_steps": 1, "bf16": False, "output_dir": str(out),
              **keys}
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "axlora", "train", str(path)], capture_output=True, text=True)
    (root / f"{name}.log").write_text(done.stdout + done.stderr)  # the whole output, to read after the table
    metrics = out / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if done.returncode == 0 else []
    return Run(done.returncode, [row["loss"] for row in rows if "loss" in row], done.stdout + done.stderr)


def skip_reason(check: Check) -> str | None:
    import torch

    cuda = torch.cuda.is_available()
    if check.cuda_only and not cuda:
        return "no CUDA GPU"
    if cuda and check.keys.get("num_processes", 1) > torch.cuda.device_count():
        return f"needs {check.keys['num_processes']} GPUs"  # without CUDA the processes run on the CPU over gloo
    missing = [p for p in check.packages if importlib.util.find_spec(p) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def judge(check: Check, run: Run, reference: Run | None) -> dict:
    """The result of one check: ok / failed / refused, with the figures it was judged on."""
    if check.judge == "refused":
        key = next(iter(check.keys))
        refused = run.status == 2 and f"{key}.weight_dtype" in run.output
        return {"result": "refused" if refused else "failed", "status": run.status}
    if run.status != 0 or not run.losses:
        return {"result": "failed", "status": run.status}
    if check.judge == "restarts":
        total, every = check.keys["max_steps"], check.keys["relora_steps"]
        steps = range(every, total, every)  # no restart after the last step
        missing = [step for step in steps if not re.search(rf"relora: restart \d+ after step {step}:", run.output)]
        whole = len(run.losses) == total and all(math.isfinite(loss) for loss in run.losses)
        return {"result": "ok" if whole and not missing else "failed", "losses": run.losses,
                "restarts_after": list(steps), **({"restarts_missing": missing} if missing else {})}
    count = 1 if check.judge == "first" else len(reference.losses)
    ours, theirs = run.losses[:count], reference.losses[:count]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) if len(ours) == count else math.inf
    return {"result": "ok" if worst <= check.tolerance else "failed", "losses": ours, "reference_losses": theirs,
            "relative_difference": worst, "tolerance": check.tolerance}


def summary(name: str, result: dict) -> str:
    figures = result.get("why")
    if "relative_difference" in result:
        figures = (f"loss {result['losses'][0]:.5f} vs {result['reference_losses'][0]:.5f}, worst relative "
                   f"difference {result['relative_difference']:.2e} over {len(result['losses'])} step(s) "
                   f"(tolerance {result['tolerance']:g})")
    elif "restarts_after" in result:
        figures = f"losses {', '.join(f'{loss:.4f}' for loss in result['losses'])}; restarts after steps " \
                  f"{result['restarts_after']}" + (f", missing {result['restarts_missing']}"
                                                   if "restarts_missing" in result else "")
    elif "status" in result:
        figures = f"exit status {result['status']}"
    return f"{name:16s} {result['result']:8s} {figures}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=None, help="run these checks only")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="axlora-gpu-paths-"))
    root.mkdir(parents=True, exist_ok=True)
    bases = build_models(root)
    references: dict[str, Run] = {}

    def reference_run(name: str, check: Check) -> Run:
        """The run a check is compared with, trained once for all the checks that share it."""
        label = f"{check.base} " + json.dumps(check.reference, sort_keys=True)
        if label not in references:
            run_name = f"{name}_reference" if check.reference else f"plain_{check.base}"
            references[label] = train(root, run_name, bases[check.base], check.reference)
        return references[label]

    results, failed = {}, False
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        reason = skip_reason(check)
        if reason:
            results[name] = {"result": "skipped", "why": reason}
        else:
            reference = None if check.judge in ("restarts", "refused") else reference_run(name, check)
            if reference is not None and (reference.status != 0 or not reference.losses):
                results[name] = {"result": "failed", "why": "its reference run failed", "output": reference.output[-1500:]}
            else:
                run = train(root, name, bases[check.base], check.keys)
                results[name] = judge(check, run, reference)
                if results[name]["result"] == "failed":
                    results[name]["output"] = run.output[-1500:]
        failed |= results[name]["result"] == "failed"
        print(summary(name, results[name]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
