"""Benchmark: wall time and peak RSS of ``axlora preprocess`` and a 2-step ``axlora train`` as the data grows.

For each ``--rows`` size, generates a ``completion`` JSONL (documents of 20-200 words; every size starts with
the rows of the smaller ones), then runs, each in its own fresh process:

  preprocess   ``axlora preprocess`` from an empty cache (read, tokenize, length rule, report, write);
  train        ``axlora train`` with ``max_steps: 2`` and ``sample_packing`` on the cache just written
               (a cache hit), without evaluation: what every training process holds to train on this data.

Peak RSS is the high-water mark of the largest process of the command (``ru_maxrss`` of the waited-for
children, read in a small wrapper process so that the benchmark's own size never counts). The model is a
tiny Llama with the demo tokenizer, so the figures are those of the data path alone.

    python bench/data_scale.py --workdir /tmp/axlora-scale [--rows 150000 600000 2400000] [--json figures.json]

``--no-train`` measures preprocess alone; ``--train-only`` measures train alone on the cache an earlier run left in
the same workdir (a training-side change can then be measured without preparing the data again).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import WORDS  # noqa: E402  (the same vocabulary as the preprocess benchmark)

MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], 'w')).returncode
print(code, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` completion documents of 20-200 random words, the same first rows for every size."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            text = " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))
            handle.write(json.dumps({"text": text}) + "\n")


def measure(command: list[str], log: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``command`` run in a fresh wrapper process; fails on a non-zero exit."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(log), *command], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    code, seconds, peak = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}")
    return float(seconds), int(peak)


def write_config(workdir: Path, data: Path, model: str) -> Path:
    import yaml

    config = {
        "base_model": model, "datasets": [{"path": str(data), "type": "completion"}], "sequence_len": 512,
        "sample_packing": True, "micro_batch_size": 2, "max_steps": 2, "lora_r": 4, "lora_alpha": 8,
        "lora_target_linear": True, "val_set_size": 0.01, "learning_rate": 1e-3, "save_steps": 1000,
        "eval_strategy": "no",
        "output_dir": str(workdir / "out"), "dataset_prepared_path": str(workdir / "prepared"),
    }
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_size(workdir: Path, rows: int, model: str, train: bool = True, preprocess: bool = True) -> dict:
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "completion.jsonl"
    if preprocess and (not data.exists() or sum(1 for _ in open(data, "rb")) != rows):
        generate(data, rows)
    config = write_config(workdir, data, model)
    shutil.rmtree(workdir / "out", ignore_errors=True)
    axlora = [sys.executable, "-m", "axlora"]
    pre_seconds, pre_peak = float("nan"), 0
    if preprocess:
        shutil.rmtree(workdir / "prepared", ignore_errors=True)
        pre_seconds, pre_peak = measure([*axlora, "preprocess", str(config)], workdir / "preprocess.log")
    reports = list((workdir / "prepared").glob("*/report.json"))
    if len(reports) != 1:
        raise SystemExit(f"--train-only needs the one prepared cache of an earlier run under {workdir / 'prepared'}")
    report = json.loads(reports[0].read_text())
    train_seconds, train_peak = (measure([*axlora, "train", str(config)], workdir / "train.log")
                                  if train else (float("nan"), 0))
    return {"rows": rows, "tokens": report["train"]["tokens"] + report["val"]["tokens"],
            "train_rows": report["train_rows"], "preprocess_seconds": round(pre_seconds, 1),
            "preprocess_peak_bytes": pre_peak, "train_seconds": round(train_seconds, 1),
            "train_peak_bytes": train_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[150_000, 600_000, 2_400_000])
    parser.add_argument("--model", default="axlora:tiny-llama")
    parser.add_argument("--json", type=Path)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--no-train", action="store_true", help="measure preprocess only")
    only.add_argument("--train-only", action="store_true", help="measure train only, on an earlier run's cache")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    results = []
    started = time.perf_counter()
    for rows in args.rows:
        results.append(run_size(args.workdir / f"rows-{rows}", rows, args.model, train=not args.no_train,
                                preprocess=not args.train_only))
        print(json.dumps(results[-1]), flush=True)
    gib = 1 << 30
    print(f"\n{'rows':>10} {'tokens':>12} {'prep s':>8} {'prep peak':>10} {'train s':>8} {'train peak':>11}")
    for r in results:
        print(f"{r['rows']:>10,} {r['tokens']:>12,} {r['preprocess_seconds']:>8.1f} "
              f"{r['preprocess_peak_bytes'] / gib:>6.2f} GiB {r['train_seconds']:>8.1f} "
              f"{r['train_peak_bytes'] / gib:>7.2f} GiB")
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
