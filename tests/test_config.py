"""Config loading: strict keys with suggestions, every problem at once with its line, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from axlora.config.load import load_config
from axlora.config.schema import json_schema
from axlora.core.errors import ConfigError, UserError

from conftest import REPO, run_cli

BASE = """\
base_model: /models/x
datasets:
  - path: data.jsonl
    type: alpaca
lora_target_linear: true
max_steps: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(text)
    return path


def problems_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_misspelt_key_is_named_with_line_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "lora_rr: 4\n")
    [problem] = problems_of(path)
    assert problem == f"{path}:7: unknown key 'lora_rr' (did you mean 'lora_r'?)"


def test_all_problems_reported_together(tmp_path):
    text = BASE.replace("base_model: /models/x\n", "") + "lora_r: many\nlearning_rate: -1\nmicro_batch_sise: 2\n"
    problems = problems_of(write(tmp_path, text))
    joined = "\n".join(problems)
    assert len(problems) == 1 and "micro_batch_sise" in joined and "micro_batch_size" in joined
    # unknown keys are reported first; once fixed, the type problems come together with their lines
    problems = problems_of(write(tmp_path, text.replace("micro_batch_sise: 2\n", "")))
    assert len(problems) == 3
    assert any(p.endswith("base_model: required key is missing.") for p in problems)
    assert any(":6: lora_r:" in p and "'many'" in p for p in problems)
    assert any(":7: learning_rate:" in p and "greater than 0" in p for p in problems)


def test_unknown_key_inside_dataset_entry(tmp_path):
    path = write(tmp_path, BASE.replace("    type: alpaca\n", "    type: alpaca\n    spilt: train\n"))
    [problem] = problems_of(path)
    assert ":5: unknown key 'datasets[0].spilt' (did you mean 'split'?)" in problem


def test_contradictions_name_their_keys(tmp_path):
    text = BASE.replace("lora_target_linear: true\n", "").replace("max_steps: 10\n", "")
    problems = problems_of(write(tmp_path, text))
    assert any("num_epochs / max_steps" in p for p in problems)
    assert any("lora_target_modules" in p and "lora_target_linear" in p for p in problems)


def test_axolotl_habits_empty_values_and_string_numbers(tmp_path):
    path = write(tmp_path, BASE + "learning_rate: 2e-4\nwarmup_steps:\nbf16: auto\n")
    config = load_config(path)
    assert config.learning_rate == pytest.approx(2e-4)
    assert config.warmup_steps is None and config.bf16 == "auto"


def test_overrides_are_type_checked(tmp_path):
    path = write(tmp_path, BASE)
    config = load_config(path, ["--lora_r", "4", "--lora_target_modules=[q_proj, v_proj]", "--bf16", "false"])
    assert config.lora_r == 4 and config.lora_target_modules == ["q_proj", "v_proj"] and config.bf16 is False
    [problem] = problems_of(path, ["--lora_r", "four"])
    assert problem.startswith("command line: lora_r:")
    [problem] = problems_of(path, ["--lora_rr", "4"])
    assert problem == "command line: unknown key 'lora_rr' (did you mean 'lora_r'?)"


def test_bad_yaml_names_the_line(tmp_path):
    [problem] = problems_of(write(tmp_path, BASE + "lora_r: [1,\n"))
    assert "not valid YAML" in problem and "line" in problem


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_relative_paths_resolve_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir("/")
    config = load_config(write(tmp_path, BASE))
    assert config.datasets[0].path == str(tmp_path / "data.jsonl")
    assert config.base_model == "/models/x"
    hub = load_config(write(tmp_path, BASE.replace("/models/x", "meta-llama/Llama-3.2-1B")))
    assert hub.base_model == "meta-llama/Llama-3.2-1B"


def test_cli_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, BASE + "lora_rr: 4\nnum_epochs: many\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "lora_rr" in result.stderr and "did you mean 'lora_r'" in result.stderr and ":7:" in result.stderr


def test_validate_prints_plan_without_importing_torch(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 10)
    path = write(tmp_path, BASE + "micro_batch_size: 2\ngradient_accumulation_steps: 3\n")
    code = (
        "import sys; from axlora.cli import main; rc = main(['validate', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "adapter: fresh" in result.stdout
    assert "10 rows" in result.stdout and "2 micro x 3 accumulation = 6 rows" in result.stdout


def test_schema_file_is_current():
    stored = json.loads((REPO / "schemas" / "axlora.schema.json").read_text())
    assert stored == json_schema(), "schemas/axlora.schema.json is stale: run `axlora schema > schemas/axlora.schema.json`"


def test_every_field_has_a_description():
    schema = json_schema()
    missing = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert not missing


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "yaml").glob("*.yml")), ids=lambda p: p.name)
def test_shipped_yaml_validates_and_points_at_the_schema(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    assert (path.parent / first.split("=", 1)[1]).resolve() == (REPO / "schemas" / "axlora.schema.json")
    load_config(path)
    assert yaml.safe_load(path.read_text())
