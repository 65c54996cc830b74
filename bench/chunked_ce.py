"""Benchmark: memory of one LoRA training step with the model's own loss vs ``chunked_cross_entropy``.

A Llama-shaped model with Llama 3's 128,256-token vocabulary and a small body (the logits, not the body,
are what the lever changes), random weights, LoRA r=16 on all linear layers. One micro batch of
``--rows`` x ``--seq`` tokens, every token a label (the lever's worst case: it also skips masked prompt
tokens). Each variant runs in its own subprocess so peaks do not mix; a warm-up step comes first.

On CPU the figure is the step's resident-memory high-water mark above the process's memory before it
(VmHWM - VmRSS, from /proc/self/status); on CUDA it is ``torch.cuda.max_memory_allocated`` during the
step above the memory allocated before it. The losses of both variants are printed and compared.

    python bench/chunked_ce.py [--device cpu|cuda] [--rows 2] [--seq 1024] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VOCAB = 128_256


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # resets VmHWM to the current RSS
        refs.write("5")


def child(variant: str, device: str, rows: int, seq: int, hidden: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from axlora.train.chunked_loss import ChunkedCrossEntropy

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    mode = ChunkedCrossEntropy(model.get_base_model(), num_chunks=8).active if variant == "chunked" else None
    ids = torch.randint(0, VOCAB, (rows, seq), device=device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if mode is None:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            with mode():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return float(loss)

    step()  # warm-up: allocator pools, lazily built kernels
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_hwm()
        before = _status_kib("VmRSS") * 1024
    started = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"variant": variant, "loss": loss, "step_seconds": time.perf_counter() - started,
            "step_peak_bytes": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", choices=["own", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.rows, args.seq, args.hidden)))
        return
    results = {}
    for variant in ("own", "chunked"):
        command = [sys.executable, __file__, "--child", variant, "--device", args.device, "--rows", str(args.rows),
                   "--seq", str(args.seq), "--hidden", str(args.hidden)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    own, chunked = results["own"], results["chunked"]
    figures = {
        "device": args.device, "tokens": args.rows * args.seq, "vocab": VOCAB, "hidden": args.hidden,
        "own": own, "chunked": chunked,
        "peak_ratio_chunked_over_own": chunked["step_peak_bytes"] / own["step_peak_bytes"],
        "loss_difference": abs(own["loss"] - chunked["loss"]),
    }
    gib = 1024 ** 3
    print(f"{figures['tokens']} tokens, vocab {VOCAB}, {args.device}")
    for name in ("own", "chunked"):
        r = results[name]
        print(f"  {name:8s} step peak {r['step_peak_bytes'] / gib:6.2f} GiB  step {r['step_seconds']:6.2f} s  "
              f"loss {r['loss']:.6f}")
    print(f"  peak ratio chunked/own {figures['peak_ratio_chunked_over_own']:.3f}, "
          f"loss difference {figures['loss_difference']:.2e}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
