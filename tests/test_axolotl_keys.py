"""The Axolotl key table: rejected keys are named with a reason, no-op keys pass with a note, nothing is dropped."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from axlora.config import axolotl
from axlora.config.load import load_config
from axlora.config.schema import Config, json_schema
from axlora.core.errors import ConfigError
from axlora.train.intervals import evaluates_at, saves_at

from conftest import REPO, run_cli

BASE = """\
base_model: NousResearch/Llama-3.2-1B
datasets:
  - path: yahma/alpaca-cleaned
    type: alpaca
lora_target_linear: true
max_steps: 10
"""
SCHEMA_KEYS = set(Config.model_fields)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "axolotl.yml"
    path.write_text(BASE + text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, log=lambda _note: None)
    return info.value.problems


def notes_of(path: Path) -> list[str]:
    notes: list[str] = []
    load_config(path, log=notes.append)
    return notes


@pytest.mark.parametrize("key", ["vllm", "image_size", "lisa_n_layers", "use_ray", "tensor_parallel_size",
                                 "use_pose", "use_comet", "gptq", "qat", "lr_groups"])
def test_rejected_key_is_named_with_its_line_and_reason(tmp_path, key):
    path = write(tmp_path, f"{key}: yes\n")
    [problem] = problems_of(path)
    rule = axolotl.REJECTED[key]
    assert problem == f"{path}:7: {key}: {rule.reason}; remove it (Axolotl key)."


def test_every_rejected_key_refuses_a_value_and_accepts_off(tmp_path):
    keys = sorted(set(axolotl.REJECTED) - SCHEMA_KEYS)
    asked = "".join(f"{key}: asked-for\n" for key in keys)
    problems = problems_of(write(tmp_path, asked))
    assert len(problems) == len(keys)
    off = "".join(f"{key}: {'true' if axolotl.REJECTED[key].accepted == 'true' else 'false'}\n" for key in keys
                  if key != "base_model_config")
    assert notes_of(write(tmp_path, off + "base_model_config: NousResearch/Llama-3.2-1B\n")) == []


def test_every_noop_key_is_accepted_with_a_note(tmp_path):
    keys = sorted(set(axolotl.NO_OP) - SCHEMA_KEYS)
    notes = notes_of(write(tmp_path, "".join(f"{key}: 1\n" for key in keys)))
    assert len(notes) == len(keys)
    for key, note in zip(keys, notes, strict=True):
        assert f"'{key}' has no effect in axlora: {axolotl.NO_OP[key].reason}." in note


def test_misspelt_keys_still_get_suggestions(tmp_path):
    problems = problems_of(write(tmp_path, "wandb_projet: x\ndebgu: true\nlora_rr: 4\n"))
    assert problems[0].endswith("unknown key 'wandb_projet' (did you mean 'wandb_project'?)")
    assert problems[1].endswith("unknown key 'debgu' (did you mean 'debug'?)")
    assert problems[2].endswith("unknown key 'lora_rr' (did you mean 'lora_r'?)")


def test_blank_adapter_is_axolotl_full_finetuning_and_refused(tmp_path):
    [problem] = problems_of(write(tmp_path, "adapter:\n"))
    assert ":7: adapter: empty means full fine-tuning in Axolotl" in problem and "adapter: lora" in problem


def test_renamed_key_together_with_its_new_name_is_refused(tmp_path):
    [problem] = problems_of(write(tmp_path, "evaluation_strategy: steps\neval_strategy: epoch\neval_steps: 5\n"))
    assert "'evaluation_strategy' is Axolotl's name for 'eval_strategy'" in problem


@pytest.mark.parametrize(("text", "expected"), [
    ("gradient_checkpointing: offload_disk\n", "offloading to disk or Unsloth's checkpointing is not supported"),
    ("bf16: full\n", "use bf16: true"),
    ("save_strategy: best\n", "use save_strategy: steps or epoch"),
    ("hub_strategy: every_save\n", "use hub_strategy: end"),
    ("adapter: llama-adapter\n", "axlora trains LoRA adapters only"),
])
def test_axolotl_only_values_say_what_to_write(tmp_path, text, expected):
    [problem] = problems_of(write(tmp_path, text))
    assert ":7: " in problem and expected in problem


def test_plugins_map_to_speed_notes_or_named_refusals(tmp_path):
    notes = notes_of(write(tmp_path, "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n  - CutCrossEntropyPlugin\n"))
    assert len(notes) == 2 and all(":7: plugin " in n for n in notes)
    assert "speed and memory only" in notes[0] and "reads it as cut_cross_entropy: true" in notes[1]
    problems = problems_of(write(tmp_path, "plugins:\n  - axolotl.integrations.kd.KDPlugin\n  - acme.MyPlugin\n"))
    assert "KDPlugin is not supported: knowledge distillation" in problems[0]
    assert "unknown Axolotl plugin 'acme.MyPlugin'" in problems[1]


def test_plugin_equivalent_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(axolotl.PLUGINS, "LigerPlugin", axolotl.Plugin("Liger kernels", True, equivalent="liger: true"))
    [note] = notes_of(write(tmp_path, "plugins: [axolotl.integrations.liger.LigerPlugin]\n"))
    assert "is liger: true in axlora" in note


def test_a_schema_key_wins_over_the_table(tmp_path, monkeypatch):
    monkeypatch.setitem(axolotl.REJECTED, "lora_r", axolotl.Rejected("never"))
    config = load_config(write(tmp_path, "lora_r: 4\n"), log=lambda _n: None)
    assert config.lora_r == 4


def test_conflicting_choices_name_both_keys(tmp_path):
    problems = problems_of(write(tmp_path, "flash_attention: true\nsdp_attention: true\n"))
    assert any("flash_attention / sdp_attention: choose one attention implementation" in p for p in problems)
    problems = problems_of(write(tmp_path, "load_in_4bit: true\nload_in_8bit: true\n"))
    assert any("load_in_4bit / load_in_8bit" in p for p in problems)
    problems = problems_of(write(tmp_path, "evals_per_epoch: 2\neval_steps: 10\n"))
    assert any("eval_steps / evals_per_epoch" in p for p in problems)
    problems = problems_of(write(tmp_path, "model_type: AutoModelForImageTextToText\n"))
    assert any("model_type:" in p and "causal language models" in p for p in problems)
    problems = problems_of(write(tmp_path, "attn_implementation: s2\n"))
    assert any("attn_implementation: 's2' is not available" in p for p in problems)


def test_command_line_overrides_go_through_the_table(tmp_path):
    path = write(tmp_path, "")
    notes: list[str] = []
    config = load_config(path, ["--debug", "true", "--model_revision", "v2"], log=notes.append)
    assert config.revision_of_model == "v2" and notes == ["note: command line: 'debug' has no effect in axlora: "
                                                          + axolotl.NO_OP["debug"].reason + "."]
    with pytest.raises(ConfigError, match="command line: vllm:"):
        load_config(path, ["--vllm", "yes"])


def test_cli_prints_notes_on_stderr_and_rejections_exit_2(tmp_path):
    ok = run_cli("validate", str(write(tmp_path, "loss_watchdog_threshold: 5.0\n")))
    assert ok.returncode == 0, ok.stderr
    assert "note: " in ok.stderr and "loss_watchdog_threshold" in ok.stderr and "note" not in ok.stdout
    bad = run_cli("validate", str(write(tmp_path, "vllm: yes\nimage_size: 224\n")))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert ":7: vllm:" in bad.stderr and ":8: image_size:" in bad.stderr


def test_noop_keys_are_in_the_json_schema_and_rejected_ones_are_not():
    properties = json_schema()["properties"]
    assert "debug" in properties and "plugins" in properties and "model_config" in properties
    assert "vllm" not in properties and "image_size" not in properties


def _generator():
    spec = importlib.util.spec_from_file_location("gen_axolotl_compat", REPO / "scripts" / "gen_axolotl_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compat_doc_is_current():
    page = REPO / "docs" / "axolotl-compat.md"
    assert page.read_text(encoding="utf-8") == _generator().render(), (
        "docs/axolotl-compat.md is stale: run `python scripts/gen_axolotl_compat.py`"
    )


def test_compat_doc_names_every_key():
    text = _generator().render()
    for key in [*SCHEMA_KEYS, *axolotl.NO_OP, *axolotl.REJECTED, *axolotl.RENAMED, *axolotl.PLUGINS]:
        assert f"`{key}`" in text, key


def test_eval_and_save_cadence(tmp_path):
    def cadence(text: str, total: int = 40, per_epoch: int = 20):
        config = load_config(write(tmp_path, text), log=lambda _n: None)
        evals = [s for s in range(1, total + 1) if evaluates_at(config, s, total, per_epoch)]
        saves = [s for s in range(1, total + 1) if saves_at(config, s, total, per_epoch)]
        return evals, saves

    assert cadence("") == ([40], [])  # axlora's default: evaluate at the end, no checkpoints
    assert cadence("evals_per_epoch: 4\nsaves_per_epoch: 2\n") == ([5, 10, 15, 20, 25, 30, 35, 40], [10, 20, 30])
    assert cadence("eval_strategy: epoch\nsave_strategy: epoch\n") == ([20, 40], [20])
    assert cadence("eval_steps: 0.25\nsave_steps: 15\n") == ([10, 20, 30, 40], [15, 30])
    assert cadence("eval_strategy: 'no'\nsave_first_step: true\n") == ([], [1])
    problems = problems_of(write(tmp_path, "eval_strategy: 'no'\nearly_stopping_patience: 2\n"))
    assert any("eval_strategy / early_stopping_patience" in p for p in problems)
    problems = problems_of(write(tmp_path, "save_steps: 12.5\n"))
    assert any("save_steps: a step count must be whole" in p for p in problems)


def test_load_best_model_at_end_is_a_setting_early_stopping_shares(tmp_path):
    asked = write(tmp_path, "load_best_model_at_end: true\n")
    assert load_config(asked, log=lambda _note: None).load_best_model_at_end is True
    with_patience = write(tmp_path, "load_best_model_at_end: true\nearly_stopping_patience: 3\neval_steps: 10\n"
                          "val_set_size: 0.1\n")
    config = load_config(with_patience, log=lambda _note: None)
    assert config.early_stopping_patience == 3
