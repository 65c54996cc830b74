"""bench/axolotl_examples.py counts accepted Axolotl configs and the keys refusing the others, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from conftest import REPO


def test_counts_accepted_files_and_refusing_keys(tmp_path):
    for name in ("qwen2.5-chat-template.yml", "plugins-and-kernels.yml"):
        shutil.copy(REPO / "tests" / "axolotl_configs" / name, tmp_path / name)
    (tmp_path / "refused.yml").write_text(
        (REPO / "tests" / "axolotl_configs" / "qwen2.5-chat-template.yml").read_text()
        + "lisa_n_layers: 2\nlora_rr: 4\n")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "axolotl_examples.py"), str(tmp_path), "--show"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused.yml: lisa_n_layers, lora_rr" in done.stdout
    assert "accepted 2/3 (67%), crashed 0" in done.stdout
    assert "    1  lisa_n_layers  (e.g. refused.yml)" in done.stdout and "    1  lora_rr" in done.stdout


def _write(folder, name, **keys):
    base = {"base_model": "Qwen/Qwen2.5-0.5B", "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
            "micro_batch_size": 1, "num_epochs": 1, "learning_rate": 2e-4, "output_dir": "./outputs/out"}
    (folder / name).write_text(yaml.safe_dump({**base, **keys}))


def test_text_lora_selects_lora_on_text_models_trained_on_a_dataset(tmp_path):
    lora = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True}
    _write(tmp_path, "lora.yml", **lora)
    _write(tmp_path, "qlora-dpo.yml", **{**lora, "adapter": "qlora"}, load_in_4bit=True, rl="dpo",
           datasets=[{"path": "argilla/distilabel-intel-orca-dpo-pairs", "type": "chatml.intel"}])
    # "vision" inside a longer key name is not a multimodal key
    _write(tmp_path, "revision.yml", **lora, revision_of_model="main", lora_rr=4)
    _write(tmp_path, "full.yml")
    _write(tmp_path, "grpo.yml", **lora, rl="grpo")
    _write(tmp_path, "processor.yml", **lora, processor_type="AutoProcessor")
    _write(tmp_path, "vision-data.yml", **lora,
           datasets=[{"path": "HuggingFaceH4/llava-instruct-mix-vsft", "type": "chat_template"}])
    done = subprocess.run([sys.executable, str(REPO / "bench" / "axolotl_examples.py"), str(tmp_path),
                           "--text-lora", "--show"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "selected 3/7 as text LoRA/QLoRA" in out
    assert "2 multimodal" in out and "1 not LoRA/QLoRA" in out and "1 online RL" in out
    for name, reason in [("full.yml", "not LoRA/QLoRA"), ("grpo.yml", "online RL"),
                         ("processor.yml", "multimodal"), ("vision-data.yml", "multimodal")]:
        assert f"left out: {name} ({reason})" in out
    # only the three selected files were validated: two accepted, the misspelt key refused
    assert "accepted 2/3 (67%), crashed 0" in out
    assert "    1  lora_rr  (e.g. revision.yml)" in out
