"""Benchmark: ``axlora preprocess`` throughput next to a raw ``tokenizer(batch)`` of the same texts.

Generates an alpaca JSONL of ``--rows`` rows (random English-like words, varied lengths, half with an
``input``), then in one process measures:

  raw      ``tokenizer(texts)``: one batched call of the fast tokenizer over the full sample texts
           (prompt + response), nothing else: the floor any preparation has to pay;
  axlora   ``prepare_data`` from an empty cache: read the JSONL, format, shuffle, split, tokenize with
           masks, apply the length rule, compute the report (with packing), write the Arrow cache and the
           histogram; once with ``dataset_processes: 1`` and once with the default (all CPUs);
  hit      ``prepare_data`` again: the cache hit a second run pays.

rows/s and tokens/s use the same row and token counts for every line (the axlora ids equal the raw ids
plus one EOS per row). Each timing is the best of ``--repeats``. The ratio axlora/raw is the figure of
merit (goal: >= 0.7).

    python bench/preprocess.py --workdir /tmp/axlora-bench-pre [--rows 100000] [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when what more if no out so said can who will up "
    "about them some could him into its then two time my only other new these any may very like our over such "
    "add number sum total result answer question explain write list describe compare reason first second step"
).split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            row = {"instruction": text(4, 20), "input": text(1, 30) if rng.random() < 0.5 else "",
                   "output": text(5, 80)}
            handle.write(json.dumps(row) + "\n")


def best_of(repeats: int, run) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure_raw(tokenizer, data: Path, repeats: int) -> tuple[float, int]:
    """Best time of one batched ``tokenizer(texts)`` over the full sample texts, and their token count."""
    from axlora.data.formats import alpaca

    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    texts = ["".join(segment.text for segment in alpaca(row)) for row in rows]
    seconds, encoded = best_of(repeats, lambda: tokenizer(texts)["input_ids"])
    return seconds, sum(map(len, encoded)) + len(rows)  # + the EOS axlora appends: both lines count the same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from axlora.config.schema import Config
    from axlora.data.prepare import prepare_data
    from axlora.model.builtin import train_tiny_tokenizer
    from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "alpaca.jsonl"
    if not data.exists() or sum(1 for _ in open(data)) != args.rows:
        generate(data, args.rows)
    tokenizer_dir = args.workdir / "tokenizer"
    if not tokenizer_dir.exists():
        train_tiny_tokenizer().save_pretrained(tokenizer_dir)

    def config(processes: int | None) -> Config:
        return Config.model_validate({
            "base_model": "/unused", "tokenizer_config": str(tokenizer_dir), "lora_target_linear": True,
            "max_steps": 1, "datasets": [{"path": str(data), "type": "alpaca"}], "sequence_len": 2048,
            "val_set_size": 0, "dataset_processes": processes, "output_dir": str(args.workdir / "out"),
            "dataset_prepared_path": str(args.workdir / "prepared"),
        })

    tokenizer = load_tokenizer(config(None), log=lambda *_: None)
    fingerprint = tokenizer_fingerprint(tokenizer)
    raw_seconds, tokens = measure_raw(tokenizer, data, args.repeats)  # its texts and ids are freed on return
    rows_count = args.rows

    def prepare(processes: int | None):
        shutil.rmtree(args.workdir / "prepared", ignore_errors=True)
        return prepare_data(config(processes), tokenizer, fingerprint, log=lambda *_: None)

    serial_seconds, serial = best_of(args.repeats, lambda: prepare(1))
    parallel_seconds, parallel = best_of(args.repeats, lambda: prepare(None))
    hit_seconds, hit = best_of(args.repeats, lambda: prepare_data(config(None), tokenizer, fingerprint,
                                                                   log=lambda *_: None))
    assert hit.cache_hit and len(parallel.train) == len(serial.train) == rows_count
    assert parallel.report["train"]["tokens"] == tokens, (parallel.report["train"]["tokens"], tokens)

    def line(name: str, seconds: float) -> dict:
        return {"name": name, "seconds": round(seconds, 3), "rows_per_s": round(rows_count / seconds),
                "tokens_per_s": round(tokens / seconds), "vs_raw": round(raw_seconds / seconds, 2)}

    figures = {
        "rows": rows_count, "tokens": tokens, "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "tokenizer": "axlora demo byte-level BPE (vocab 371)", "python": platform.python_version(),
        "results": [
            line("raw tokenizer(batch)", raw_seconds),
            line("axlora prepare, dataset_processes 1", serial_seconds),
            line("axlora prepare, dataset_processes default", parallel_seconds),
            line("axlora cache hit", hit_seconds),
        ],
    }
    print(f"{figures['rows']:,} rows, {figures['tokens']:,} tokens, {figures['cpus_available']} CPUs available")
    print(f"{'':42} {'seconds':>8} {'rows/s':>10} {'tokens/s':>12} {'vs raw':>7}")
    for result in figures["results"]:
        print(f"{result['name']:42} {result['seconds']:8.2f} {result['rows_per_s']:10,} "
              f"{result['tokens_per_s']:12,} {result['vs_raw']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
