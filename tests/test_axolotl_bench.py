"""bench/axolotl_examples.py counts accepted Axolotl configs and the keys refusing the others, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def test_counts_accepted_files_and_refusing_keys(tmp_path):
    for name in ("qwen2.5-chat-template.yml", "plugins-and-kernels.yml"):
        shutil.copy(REPO / "tests" / "axolotl_configs" / name, tmp_path / name)
    (tmp_path / "refused.yml").write_text(
        (REPO / "tests" / "axolotl_configs" / "qwen2.5-chat-template.yml").read_text()
        + "scaling_softmax: true\nlora_rr: 4\n")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "axolotl_examples.py"), str(tmp_path), "--show"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused.yml: lora_rr, scaling_softmax" in done.stdout
    assert "accepted 2/3 (67%), crashed 0" in done.stdout
    assert "    1  scaling_softmax" in done.stdout and "    1  lora_rr" in done.stdout
