"""Dataset entries without ``path`` (Axolotl's ``ds_type: json`` + ``data_files``): local files, found beside the
config like other paths, read in the format ds_type names, prepared as the ``path:`` form prepares them."""

from __future__ import annotations

import json

import pytest
import yaml

from axlora.config.load import load_config
from axlora.data.demo_rows import addition_rows
from axlora.data.preference_demo import addition_pairs
from axlora.data.preference_prepare import prepare_preferences
from axlora.data.prepare import prepare_data
from axlora.model.tokenizer import tokenizer_fingerprint

from conftest import main_in_process


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config directory with its data in data/ (suffixes that do not say the format); run from elsewhere."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    for name, rows in (("sums.part1", addition_rows(12, seed=1)), ("sums.part2", addition_rows(8, seed=2)),
                       ("pairs.part1", addition_pairs(10))):
        (folder / "data" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.chdir(tmp_path)
    return folder


def write_config(folder, name: str, datasets: list[dict], tiny_model_dir, **keys):
    data = {"base_model": str(tiny_model_dir), "lora_target_linear": True, "max_steps": 1, "sequence_len": 128,
            "output_dir": str(folder / f"out-{name}"), "val_set_size": 2, "datasets": datasets, **keys}
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prepared_rows(config, tokenizer) -> list[tuple[list[int], list[int]]]:
    data = prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda _line: None)
    return [(list(row["input_ids"]), list(row["labels"])) for part in (data.train, data.val) for row in part]


def test_supervised_entry_prepares_the_rows_of_the_path_form(project, tokenizer, tiny_model_dir, capsys):
    files = write_config(project, "files", [{"ds_type": "json", "data_files": ["data/sums.part1", "data/sums.part2"],
                                             "split": "train", "type": "alpaca"}], tiny_model_dir)
    folder = write_config(project, "folder", [{"path": "data", "data_files": ["sums.part*"], "ds_type": "json",
                                               "type": "alpaca"}], tiny_model_dir)
    by_files, by_folder = load_config(files, log=print), load_config(folder, log=print)
    expected = [str(project / "data" / "sums.part1"), str(project / "data" / "sums.part2")]
    assert by_files.datasets[0].path is None and by_files.datasets[0].data_files == expected
    rows = prepared_rows(by_files, tokenizer)
    assert len(rows) == 20 and rows == prepared_rows(by_folder, tokenizer)
    plan = main_in_process(capsys, "validate", str(files))
    assert plan.returncode == 0 and f"dataset: {', '.join(expected)} (local data_files, type alpaca" in plan.stdout
    report = main_in_process(capsys, "preprocess", str(files))
    assert report.returncode == 0 and f"1. {', '.join(expected)} (type alpaca" in report.stdout


def test_preference_entry_prepares_the_rows_of_the_path_form(project, tokenizer, tiny_model_dir):
    def prepared(name, entry):
        config = load_config(write_config(project, name, [{"type": "chat_template.default", **entry}],
                                          tiny_model_dir, rl="dpo"), log=print)
        data = prepare_preferences(config, tokenizer, log=lambda _line: None)
        return [sorted(row.items()) for part in (data.train, data.val) for row in part]

    rows = prepared("files", {"ds_type": "json", "data_files": "data/pairs.part1", "split": "train"})
    assert len(rows) == 10 and rows == prepared("path", {"path": "data/pairs.part1", "ds_type": "json"})


def test_a_missing_data_file_exits_2_naming_it(project, tiny_model_dir, capsys):
    hub_style = write_config(project, "hub", [{"ds_type": "json", "data_files": ["mlabonne/orpo-dpo-mix-40k"],
                                               "type": "alpaca"}], tiny_model_dir)
    assert main_in_process(capsys, "validate", str(hub_style)).returncode == 0  # may be a Hub name: checked when read
    result = main_in_process(capsys, "preprocess", str(hub_style))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mlabonne/orpo-dpo-mix-40k: dataset file not found; data_files without path are local" in result.stderr
    local = write_config(project, "local", [{"data_files": ["data/sums.part1", "data/missing.jsonl"],
                                             "ds_type": "json", "type": "alpaca"}], tiny_model_dir)
    result = main_in_process(capsys, "validate", str(local))
    assert result.returncode == 2 and "data_files: '" in result.stderr and "data/missing.jsonl' not found" in result.stderr


def test_an_entry_needs_a_path_or_data_files(project, tiny_model_dir, capsys):
    result = main_in_process(capsys, "validate", str(write_config(project, "none", [{"type": "alpaca"}],
                                                                  tiny_model_dir)))
    assert result.returncode == 2 and "datasets[0]: path: required key is missing (or give data_files" in result.stderr
