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
    assert not any("num_epochs / max_steps" in p for p in problems)  # neither: one epoch, Axolotl's default
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


def test_validate_names_what_changes_the_training(tmp_path):
    from axlora.validate import describe_plan

    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 10)
    plain = describe_plan(load_config(write(tmp_path, BASE)))
    assert "training:" not in plain
    plan = describe_plan(load_config(write(tmp_path, BASE + "relora_steps: 50\nnum_processes: 4\n"
                                                     "expert_parallel_size: 2\ndiffusion: true\n")))
    assert "training: LoRA merged into the base and restarted every 50 steps (ReLoRA)" in plan
    assert "training: experts split over groups of 2 processes (expert parallelism)" in plan
    assert "training: masked diffusion objective (diffusion)" in plan


def test_no_two_config_sections_define_the_same_name():
    """Config combines the sections by inheritance: a validator named like another section's would replace it."""
    from axlora.config.schema import Config

    owners: dict[str, list[str]] = {}
    for section in Config.__mro__:
        for name in vars(section):
            if not name.startswith("__") and name not in ("model_config", "_abc_impl"):
                owners.setdefault(name, []).append(section.__name__)
    assert {name: where for name, where in owners.items() if len(where) > 1} == {}


def test_schema_file_is_current():
    stored = json.loads((REPO / "schemas" / "axlora.schema.json").read_text())
    assert stored == json_schema(), "schemas/axlora.schema.json is stale: run `axlora schema > schemas/axlora.schema.json`"


def test_a_reader_that_leaves_early_ends_the_output_quietly():
    """`axlora schema | head -c 10`: the closed pipe stops the command without a traceback."""
    writer = subprocess.Popen([sys.executable, "-m", "axlora", "schema"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=REPO)
    writer.stdout.read(10)
    writer.stdout.close()
    assert writer.wait(timeout=120) == 141
    assert b"Traceback" not in writer.stderr.read()


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


def test_duplicated_key_names_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, BASE.replace("    type: alpaca\n", "    type: alpaca\n    type: completion\n") + "max_steps: 20\n")
    problems = problems_of(path)
    assert problems == [
        f"{path}:5: key 'datasets[0].type' is written twice (lines 4 and 5); YAML would silently keep the last "
        "value: keep one.",
        f"{path}:8: key 'max_steps' is written twice (lines 7 and 8); YAML would silently keep the last value: "
        "keep one.",
    ]


def test_merge_keys_are_no_duplicates(tmp_path):
    text = BASE.replace("datasets:\n  - path: data.jsonl\n    type: alpaca\n",
                        "datasets:\n  - &data {path: data.jsonl, type: alpaca}\n  - <<: *data\n    path: more.jsonl\n")
    config = load_config(write(tmp_path, text))
    assert [d.type for d in config.datasets] == ["alpaca", "alpaca"]
    assert config.datasets[1].path.endswith("more.jsonl")


@pytest.mark.parametrize("key, kind", [("1", "an int"), ("~", "a null"), ("null", "a null"), ("2.5", "a float")])
def test_non_string_top_level_key_is_a_problem(tmp_path, key, kind):
    path = write(tmp_path, BASE + f"{key}: 3\n")
    assert problems_of(path) == [f"{path}:7: key '{key}' is read as {kind}, not a name; config keys are names "
                                 "(quote it if it is meant as one)."]


def test_non_string_key_in_a_dataset_entry_exits_2(tmp_path):
    path = write(tmp_path, BASE.replace("    type: alpaca\n", "    type: alpaca\n    7: x\n"))
    result = run_cli("validate", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}:5: key '7' is read as an int" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("depth, expected", [(5000, "nested far too deeply to read"),
                                             (150, "foo[0]: nested more than 100 levels deep")])
def test_absurd_nesting_is_a_problem(tmp_path, depth, expected):
    for style, text in (("flow", "foo: " + "[" * depth + "]" * depth + "\n"),
                        ("block", "foo:\n" + "".join("  " * i + "-\n" for i in range(1, depth)))):
        [problem] = problems_of(write(tmp_path, BASE + text))
        assert expected in problem and problem.startswith(f"{tmp_path / 'c.yml'}:"), (style, problem)


def test_alias_inside_itself_is_a_problem(tmp_path):
    [problem] = problems_of(write(tmp_path, BASE + "foo: &loop [1, *loop]\n"))
    assert problem.endswith("foo[1]: an alias refers to a list or mapping that contains it.")


def test_unclosed_bracket_names_where_it_opens(tmp_path):
    path = write(tmp_path, BASE + "lora_target_modules: [q_proj,\n  v_proj\nlora_r: 8\nlora_alpha: 16\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:9: not valid YAML: expected ',' or ']'")
    assert problem.endswith("the flow sequence it belongs to starts at line 7")


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_seed_range_is_checked(tmp_path, seed, ok):
    path = write(tmp_path, BASE + f"seed: {seed}\n")
    if ok:
        assert load_config(path).seed == seed
    else:
        [problem] = problems_of(path)
        assert problem.startswith(f"{path}:7: seed: Input should be")


def test_seed_out_of_range_fails_validate(tmp_path):
    result = run_cli("validate", str(write(tmp_path, BASE)), "--seed", "-1")
    assert result.returncode == 2 and "seed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ['""', "'  '"])
def test_empty_output_dir_is_a_problem(tmp_path, value):
    path = write(tmp_path, BASE + f"output_dir: {value}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:7: output_dir: must name a directory")
