"""LoRA training throughput: axlora against a hand-written transformers Trainer + peft baseline (issue 9).

Both sides train the same random-weight Llama (built from a config, no download) with the same LoRA
(r=16, alpha 32, dropout 0 on q,k,v,o,gate,up,down), AdamW lr 2e-4 constant, on the same synthetic
pre-tokenized rows (log-normal lengths: median 200 tokens, sigma 0.6, clipped 16..2048, labels on every
token), each in its own subprocess, for ``--steps`` optimizer steps; the first ``--warmup`` are not timed.

- baseline: ``Trainer`` + ``get_peft_model``, bf16 + SDPA on a GPU, micro batch padded to the longest row
  in it (8B: 4 rows, 1B: 8, tiny: 4), no packing. A callback times the steps and the trainer counts the real
  (non-pad) tokens of each step.
- axlora: ``axlora train`` on an equivalent YAML with ``sample_packing: true``, one packed row of
  ``sequence_len`` (4096 on a GPU) per micro batch, ``bf16: auto``, flash attention where ``flash_attn`` is
  importable (else SDPA). Tokens/s come from ``logs/metrics.jsonl`` (``tokens_per_second`` of each step after
  warm-up, ``logging_steps: 1``), memory from ``final/train_summary.json`` (``peak_memory_bytes``).

Reported: real tokens/s (all timed steps' real tokens over their wall time; for axlora, whose packed steps
hold nearly equal token counts, the harmonic mean of the per-step rates, which is the same quantity), peak
``torch.cuda.max_memory_allocated`` on a GPU (peak RSS on a CPU), axlora/baseline ratios, and on a GPU
the model-FLOPs utilisation:

    FLOPs per real token = 4 * N_frozen + 6 * N_lora
        N_frozen: parameters of the frozen matmuls (every q,k,v,o,gate,up,down projection and lm_head;
                  the embedding lookup is no matmul), 2 FLOPs/param forward + 2 backward for the gradient
                  of the activations (frozen weights get no weight gradient);
        N_lora:   LoRA A and B parameters, 2 forward + 2 activation-gradient + 2 weight-gradient.
    Attention scores (QK^T, PV) are left out: with ~200-token documents they add ~1% at 8B.
    MFU = tokens/s * FLOPs per token / peak dense bf16 FLOP/s.

Peak dense bf16 tensor FLOP/s: H100 SXM 989.4e12, H200 (SXM and NVL: same GH100 die and clocks) 989.4e12,
H100 PCIe 756e12 -- NVIDIA's datasheets give 1,979 / 1,513 TFLOPS "with sparsity", twice the dense figure
(https://www.nvidia.com/en-us/data-center/h100/ , https://www.nvidia.com/en-us/data-center/h200/ ; per-type
table: https://glennklockwood.com/garden/processors/h100). Other GPUs: pass ``--peak-tflops``.

On the device (one command per shape; each stays well under 10 minutes; the model, tokenizer and data are
built once under ``--workdir`` and reused by later runs):

    python bench/gpu/lora_throughput.py --shape llama-3.1-8b --steps 30 --warmup 5 --json bench-8b.json
    python bench/gpu/lora_throughput.py --shape llama-3.2-1b --steps 30 --warmup 5 --json bench-1b.json

CPU smoke test (what tests/test_bench_gpu_smoke.py runs):

    python bench/gpu/lora_throughput.py --shape tiny --steps 3 --warmup 1 --rows 40 --json out.json

``--only baseline|axlora`` runs one side; ``--workdir`` defaults to ``/tmp/axlora-bench``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LR = 16, 32, 2e-4

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=2048),
}
BASELINE_BATCH = {"llama-3.1-8b": 4, "llama-3.2-1b": 8, "tiny": 4}
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4)]


# ---- setup: model, tokenizer, data -------------------------------------------------------------------------

def build_model(shape: str, target: Path, cuda: bool) -> None:
    """A random-weight Llama of the shape plus a tokenizer of the same vocabulary size, saved once."""
    if (target / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tokenizer = word_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.save_pretrained(tmp)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):  # random init of 8B params is minutes on a CPU
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(tmp)
    del model
    if cuda:  # the two sides run in child processes: leave them the whole GPU
        torch.cuda.empty_cache()
    tmp.rename(target)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids cover the model's whole vocabulary (axlora checks pre-tokenized ids
    against it): specials 0-3, then ``t4`` ... The rows are pre-tokenized, so its text side never matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def make_rows(count: int, vocab: int, max_len: int, median: float, sigma: float, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = int(round(rng.lognormvariate(math.log(median), sigma)))
        length = max(16, min(length, 2048, max_len))
        rows.append([rng.randrange(4, vocab) for _ in range(length)])  # 0-3: the tokenizer's special tokens
    return rows


def write_data(path: Path, rows: list[list[int]]) -> None:
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"input_ids": r, "labels": r}) + "\n" for r in rows))
    tmp.rename(path)


def frozen_and_lora_params(shape: str) -> tuple[int, int]:
    """Parameters of the frozen matmuls (projections + lm_head) and of the LoRA adapters."""
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * (h // s["num_attention_heads"])
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    frozen = layers * sum(i * o for i, o in dims.values()) + s["vocab_size"] * h
    lora = layers * sum(LORA_R * (i + o) for i, o in dims.values())
    return frozen, lora


def peak_flops(override_tflops: float | None) -> tuple[float | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(0)
    if override_tflops:
        return override_tflops * 1e12, name
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, name
    return None, name


# ---- baseline: transformers Trainer + peft (runs in its own process) ---------------------------------------

def run_baseline(args) -> dict:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    work = Path(args.workdir)
    rows = [json.loads(line)["input_ids"] for line in (work / "data.jsonl").read_text().splitlines()]
    pad_id = 3  # word_tokenizer's <pad>

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    def collate(batch):
        longest = max(len(r) for r in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = ids[i, : len(r)]
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(
        work / "model", dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa",
        **({"device_map": {"": 0}} if cuda else {}))
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    step_tokens: list[int] = []
    step_ends: list[float] = []

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kwargs)

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(work / "baseline-out"), per_device_train_batch_size=BASELINE_BATCH[args.shape],
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, bf16=cuda, use_cpu=not cuda, logging_steps=10_000, save_strategy="no",
        report_to="none", seed=42, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = CountingTrainer(model=model, args=training_args, train_dataset=Rows(), data_collator=collate,
                              callbacks=[Timer()])
    trainer.train()
    # timed: steps warmup+1 .. steps, each from the end of the previous step to its own end
    timed_tokens = sum(step_tokens[args.warmup: args.steps])
    seconds = step_ends[args.steps - 1] - step_ends[args.warmup - 1]  # main() checks 1 <= warmup < steps
    return {
        "tokens_per_second": timed_tokens / seconds,
        "timed_steps": args.steps - args.warmup,
        "timed_tokens": timed_tokens,
        "timed_seconds": seconds,
        "micro_batch_size": BASELINE_BATCH[args.shape],
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# ---- axlora: axlora train on an equivalent YAML -----------------------------------------------------------

def axlora_config(args, cuda: bool) -> dict:
    import importlib.util

    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    return {
        "base_model": str(Path(args.workdir, "model").resolve()),
        "datasets": [{"path": str(Path(args.workdir, "data.jsonl").resolve())}],  # no type: pre-tokenized
        "val_set_size": 0,
        "sequence_len": args.sequence_len,
        "sample_packing": True,
        "adapter": "lora",
        "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": LR,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "bf16": "auto",
        "logging_steps": 1,
        **({"flash_attention": True} if flash else {"sdp_attention": True}),
        "output_dir": str(Path(args.workdir, "axlora-out").resolve()),
        **dict(_key_value(item) for item in args.axlora_set),
    }


def _key_value(item: str) -> tuple[str, object]:
    """``--axlora-set chunked_cross_entropy=true``: a YAML key for the axlora side (a lever to measure)."""
    import yaml

    key, _, value = item.partition("=")
    return key, yaml.safe_load(value)


def run_axlora(args, cuda: bool) -> dict:
    import yaml

    work = Path(args.workdir)
    config = axlora_config(args, cuda)
    path = work / "axlora.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = Path(config["output_dir"])
    for stale in (out / "logs" / "metrics.jsonl", out / "final" / "train_summary.json"):
        stale.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "axlora", "train", str(path)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (work / "axlora.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"axlora train failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    rates = [m["tokens_per_second"] for m in metrics if "tokens_per_second" in m and m["step"] > args.warmup]
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    peak = summary["peak_memory_bytes"]
    return {
        "tokens_per_second": len(rates) / sum(1 / r for r in rates),
        "timed_steps": len(rates),
        "step_tokens_per_second": rates,
        "sequence_len": args.sequence_len,
        "attention": "flash_attention_2" if config.get("flash_attention") else "sdpa",
        "precision": summary.get("precision"),
        "peak_gpu_allocated_bytes": peak.get("gpu_allocated_bytes"),
        "peak_rss_bytes": peak.get("cpu_rss_bytes"),
    }


# ---- driver ------------------------------------------------------------------------------------------------

def _gib(value) -> str:
    return f"{value / 2**30:.2f} GiB" if value else "-"


def report(args, results: dict, cuda: bool) -> dict:
    frozen, lora = frozen_and_lora_params(args.shape)
    flops_per_token = 4 * frozen + 6 * lora
    peak, device = peak_flops(args.peak_tflops)
    mem_key = "peak_gpu_allocated_bytes" if cuda else "peak_rss_bytes"
    figures = {"shape": args.shape, "device": device or "cpu", "steps": args.steps, "warmup": args.warmup,
               "rows": args.rows, "frozen_matmul_params": frozen, "lora_params": lora,
               "flops_per_token": flops_per_token, "flops_formula": "4*N_frozen + 6*N_lora (attention excluded)",
               "peak_flops": peak, "memory_measure": mem_key}
    print(f"\n{args.shape} on {figures['device']}: {args.steps} steps, first {args.warmup} untimed")
    print(f"{'side':<10}{'real tokens/s':>15}{'peak memory':>14}{'MFU':>8}")
    for side, res in results.items():
        if peak:
            res["mfu"] = res["tokens_per_second"] * flops_per_token / peak
        mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "-"
        print(f"{side:<10}{res['tokens_per_second']:>15,.0f}{_gib(res.get(mem_key)):>14}{mfu:>8}")
        figures[side] = res
    if {"baseline", "axlora"} <= results.keys():
        base, ax = results["baseline"], results["axlora"]
        figures["ratio_tokens_per_second"] = ax["tokens_per_second"] / base["tokens_per_second"]
        if base.get(mem_key) and ax.get(mem_key):
            figures["ratio_peak_memory"] = ax[mem_key] / base[mem_key]
        print(f"axlora/baseline: {figures['ratio_tokens_per_second']:.2f}x tokens/s, "
              f"{figures.get('ratio_peak_memory', float('nan')):.2f}x peak memory ({mem_key})")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--max-len", type=int, default=None, help="clip row lengths (default 2048; tiny: 128)")
    parser.add_argument("--median-len", type=float, default=200.0)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--sequence-len", type=int, default=None, help="axlora packed row (GPU 4096, CPU 256)")
    parser.add_argument("--workdir", default="/tmp/axlora-bench")
    parser.add_argument("--only", choices=["baseline", "axlora"], default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of an unlisted GPU")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--axlora-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra YAML key for the axlora run, e.g. chunked_cross_entropy=true (repeatable)")
    parser.add_argument("--role", choices=["baseline"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    args.max_len = args.max_len or (128 if args.shape == "tiny" else 2048)
    args.workdir = str(Path(args.workdir) / f"{args.shape}-r{args.rows}-m{args.max_len}")

    if args.role == "baseline":  # child process
        print("BASELINE_RESULT " + json.dumps(run_baseline(args)), flush=True)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; the device has no network
    import torch

    cuda = torch.cuda.is_available()
    args.sequence_len = args.sequence_len or (4096 if cuda else 256)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    build_model(args.shape, work / "model", cuda)
    write_data(work / "data.jsonl",
               make_rows(args.rows, SHAPES[args.shape]["vocab_size"], args.max_len, args.median_len, args.sigma, 0))
    print(f"setup: {work} ({time.perf_counter() - started:.0f} s)", flush=True)

    results: dict[str, dict] = {}
    if args.only in (None, "baseline"):
        child = [sys.executable, os.path.abspath(__file__), "--role", "baseline", "--shape", args.shape,
                 "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
                 "--max-len", str(args.max_len), "--workdir", str(Path(args.workdir).parent)]
        proc = subprocess.run(child, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        (work / "baseline.log").write_text(proc.stdout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BASELINE_RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"baseline failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        results["baseline"] = json.loads(lines[-1].split(" ", 1)[1])
        print(f"baseline: {results['baseline']['tokens_per_second']:,.0f} real tokens/s", flush=True)
    if args.only in (None, "axlora"):
        results["axlora"] = run_axlora(args, cuda)
        print(f"axlora: {results['axlora']['tokens_per_second']:,.0f} real tokens/s", flush=True)

    figures = report(args, results, cuda)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
