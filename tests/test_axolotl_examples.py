"""Shipped examples for real models: Hub ids kept as they are, fast GPU defaults, QLoRA where named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from axlora.config.load import load_config
from axlora.validate import describe_plan

from conftest import REPO

EXAMPLES = [p for p in sorted((REPO / "examples" / "yaml").glob("*.yml"))
            if not str(yaml.safe_load(p.read_text())["base_model"]).startswith("axlora:")]
FAMILIES = ("llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "qwen3", "mistral-7b", "gemma", "phi")


def test_every_model_family_has_lora_and_a_qlora_somewhere():
    names = [p.name for p in EXAMPLES]
    for family in FAMILIES:
        assert any(n.startswith(family) for n in names), family
    assert sum("qlora" in n for n in names) >= 5 and sum(n.endswith("-lora.yml") for n in names) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_keeps_hub_ids_and_fast_defaults(path):
    data = yaml.safe_load(path.read_text())
    notes: list[str] = []
    config = load_config(path, log=notes.append)
    assert notes == []  # shipped examples use axlora keys only
    assert config.base_model == data["base_model"] and "/" in config.base_model  # a Hub id, untouched
    assert config.datasets[0].path == data["datasets"][0]["path"]
    assert (config.sample_packing or config.rl) and config.bf16 in (True, "auto")  # preference pairs are not packed
    assert config.attention_implementation() == "flash_attention_2"
    assert config.quantization_bits() == (4 if "qlora" in path.name else None)
    assert Path(config.output_dir).is_absolute()
    plan = describe_plan(config)  # offline: Hub names are described, never fetched
    assert "Hugging Face Hub" in plan and "adapter: fresh" in plan
