"""The preference-tuning keys: rl methods and their settings, preference dataset entries, and the rules
that tie the datasets to ``rl``."""

from __future__ import annotations

import math

import pytest
import yaml

from axlora.config.load import load_config
from axlora.config.preference_keys import PreferenceDatasetConfig
from axlora.core.errors import ConfigError

from conftest import run_cli


def write(tmp_path, **keys):
    data = {"base_model": "axlora:tiny-llama", "lora_target_linear": True, "max_steps": 2,
            "datasets": [{"path": "prefs.jsonl", "type": "chatml.intel"}], **keys}
    path = tmp_path / "prefs.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_axolotl_dpo_keys_load_with_their_meaning(tmp_path):
    config = load_config(write(tmp_path, rl="dpo", rl_beta=0.2, dpo_label_smoothing=0.1, dpo_loss_type=["robust"],
                               dpo_use_weighting=True, precompute_ref_log_probs=True))
    assert config.rl == "dpo" and config.beta() == 0.2 and config.dpo_loss_type == "robust"
    assert config.dpo_use_weighting and config.precompute_ref_log_probs and config.uses_reference()
    [entry] = config.datasets
    assert isinstance(entry, PreferenceDatasetConfig) and entry.template_setting() == "chatml"


def test_method_defaults_follow_trl(tmp_path):
    assert load_config(write(tmp_path, rl="simpo")).beta() == 2.0
    orpo = load_config(write(tmp_path, rl="orpo"))
    assert orpo.beta() == 0.1 and orpo.orpo_alpha == 0.1 and not orpo.uses_reference()
    assert load_config(write(tmp_path, rl="ipo")).dpo_variant() == "ipo"
    assert load_config(write(tmp_path, rl="dpo", dpo_loss_type="hinge")).dpo_variant() == "hinge"
    assert "sample_packing / rl: dpo" in problems(write(tmp_path, rl="dpo", sample_packing=True))
    assert load_config(write(tmp_path, rl="dpo", dpo_beta=0.3)).beta() == 0.3  # Axolotl's older name


def test_online_methods_are_refused_by_name(tmp_path):
    text = problems(write(tmp_path, rl="grpo"))
    assert "rl: grpo generates answers during training" in text and ":5:" not in text
    assert "did you mean 'kto'" in problems(write(tmp_path, rl="kt0"))


def test_supervised_dataset_under_rl_names_what_is_missing(tmp_path):
    path = write(tmp_path, rl="dpo", datasets=[{"path": "a.jsonl", "type": "alpaca"}])
    text = problems(path)
    assert "datasets[0] (type alpaca) is supervised: it has no chosen and rejected answers" in text
    assert "completion label" in problems(write(tmp_path, rl="kto", datasets=[{"path": "a.jsonl", "type": "alpaca"}]))


def test_preference_dataset_without_rl_and_wrong_kind_are_refused(tmp_path):
    assert "holds preference rows; set rl" in problems(write(tmp_path))
    text = problems(write(tmp_path, rl="kto", datasets=[{"path": "p.jsonl", "type": "chat_template.default"}]))
    assert "type chat_template.default is not a kto format" in text
    text = problems(write(tmp_path, rl="dpo", datasets=[{"path": "p.jsonl", "type": "chat_template.argilla"}]))
    assert "type chat_template.argilla is not a dpo format" in text


def test_axolotl_kto_keys_load(tmp_path):
    config = load_config(write(tmp_path, rl="kto", rl_beta=0.2, kto_desirable_weight=1.0, kto_undesirable_weight=1.33,
                               datasets=[{"path": "k.jsonl", "type": "llama3.argilla_chat"}]))
    assert config.rl == "kto" and config.beta() == 0.2 and config.uses_reference()
    assert config.kto_undesirable_weight == 1.33 and config.datasets[0].template_setting() == "llama3"


def test_preference_entry_errors_name_the_key_and_line(tmp_path):
    path = write(tmp_path, rl="dpo", datasets=[{"path": "p.jsonl", "type": "chatml.intell"}])
    text = problems(path)
    assert f"{path}:6: datasets[0].type: unknown preference type 'chatml.intell'" in text
    assert "did you mean 'chatml.intel'" in text
    text = problems(write(tmp_path, rl="dpo", datasets=[{"path": "p.jsonl", "type": "chatml.intel", "feld": 1}]))
    assert "datasets[0].feld" in text


def test_validate_prints_the_plan_without_torch(tmp_path):
    rows = tmp_path / "prefs.jsonl"
    rows.write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n' * 3)
    result = run_cli("validate", str(write(tmp_path, rl="dpo", datasets=[{"path": str(rows), "type": "chatml.intel"}])))
    assert result.returncode == 0, result.stderr
    assert "type chatml.intel" in result.stdout and "3 rows" in result.stdout
    assert math.isclose(load_config(tmp_path / "prefs.yml").beta(), 0.1)
