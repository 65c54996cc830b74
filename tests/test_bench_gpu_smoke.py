"""bench/gpu/lora_throughput.py runs end to end on a CPU (tiny shape): both sides report tokens/s.

It proves the script works, so a session with a GPU only has to run it; no timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu" / "lora_throughput.py"


@pytest.mark.slow
def test_lora_throughput_tiny_runs_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "3", "--warmup", "1", "--rows", "40",
         "--workdir", str(tmp_path / "work"), "--json", str(out), "--axlora-set", "chunked_cross_entropy=true"],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    figures = json.loads(out.read_text())
    assert figures["shape"] == "tiny" and figures["device"] == "cpu"
    for side in ("baseline", "axlora"):
        assert figures[side]["tokens_per_second"] > 0, figures[side]
        assert figures[side]["timed_steps"] == 2
        assert figures[side]["peak_rss_bytes"] > 0
    assert figures["ratio_tokens_per_second"] > 0
    assert figures["flops_per_token"] == 4 * figures["frozen_matmul_params"] + 6 * figures["lora_params"]
    assert "axlora/baseline" in proc.stdout
    # --axlora-set reaches the axlora run (here: the chunked-loss lever)
    [log] = (tmp_path / "work").glob("*/axlora.log")
    assert "loss: chunked cross-entropy" in log.read_text()
