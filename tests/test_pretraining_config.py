"""pretraining_dataset in the config: Axolotl's forms accepted, what a stream cannot honour refused by key (exit 2)."""

from __future__ import annotations

import pytest

from axlora.config.load import load_config

from conftest import main_in_process


def _pretraining(make_config, tmp_path, **overrides):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "one document"}\n')
    keys = {"datasets": None, "pretraining_dataset": [{"path": str(corpus)}], **overrides}
    return make_config(**keys)


def test_axolotl_forms_are_read_with_axolotl_defaults(make_config, tmp_path):
    config = load_config(_pretraining(make_config, tmp_path, pretraining_dataset="org/corpus"), log=lambda _: None)
    (entry,) = config.pretraining_dataset
    assert (entry.path, entry.split, entry.text_column, entry.type, entry.skip) == ("org/corpus", "train", "text",
                                                                                    "pretrain", 0)
    single = {"path": "org/corpus", "name": "en", "text_column": "content", "skip": 5, "type": None}
    (entry,) = load_config(_pretraining(make_config, tmp_path, pretraining_dataset=single),
                           log=lambda _: None).pretraining_dataset
    assert (entry.name, entry.text_column, entry.skip, entry.type) == ("en", "content", 5, "pretrain")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": None, "num_epochs": 1}, "max_steps: pretraining_dataset streams a corpus of unknown length"),
        ({"datasets": [{"path": "x.jsonl", "type": "alpaca"}]}, "datasets: not with pretraining_dataset"),
        ({"val_set_size": 0.1}, "val_set_size: not with pretraining_dataset"),
        ({"group_by_length": True}, "group_by_length: not with pretraining_dataset"),
        ({"sample_prompts": [{"instruction": "hi"}]}, "sample_prompts: with pretraining_dataset a prompt is"),
        ({"pretraining_dataset": [{"path": "org/corpus", "split": "train[:10%]"}]}, "a stream cannot be sliced"),
        ({"pretraining_dataset": [{"path": "org/corpus", "type": "alpaca"}]}, "raw text (type: pretrain)"),
        ({"pretraining_dataset": [{"path": "org/corpus", "trust_remote_code": True}]}, "loading scripts"),
        ({"pretraining_sample_concatenation": True}, "pretraining_sample_concatenation: pretraining_dataset rows"),
        ({"streaming_multipack_buffer_size": 10000}, "read in order (no shuffle buffer)"),
        ({"pretrain_multipack_attn": False}, "packed documents always attend only to themselves"),
    ],
)
def test_what_a_stream_cannot_honour_exits_2_naming_the_key(make_config, tmp_path, capsys, overrides, message):
    result = main_in_process(capsys, "validate", str(_pretraining(make_config, tmp_path, **overrides)))
    assert result.returncode == 2
    assert message in result.stderr


def test_a_config_without_any_data_names_both_keys(make_config, capsys):
    result = main_in_process(capsys, "validate", str(make_config(datasets=None)))
    assert result.returncode == 2
    assert "datasets: give at least one dataset (or pretraining_dataset" in result.stderr


def test_preprocess_names_a_missing_local_corpus(make_config, tmp_path, capsys):
    path = _pretraining(make_config, tmp_path, pretraining_dataset=[{"path": str(tmp_path / "gone.jsonl")}])
    result = main_in_process(capsys, "preprocess", str(path))
    assert result.returncode == 2
    assert "gone.jsonl: file or directory not found" in result.stderr


def test_preprocess_prepares_nothing_and_reads_the_first_row(make_config, tmp_path, capsys):
    result = main_in_process(capsys, "preprocess", str(_pretraining(make_config, tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "streamed while training, nothing to prepare" in result.stdout
    assert not (tmp_path / "out" / "prepared").exists()


def test_a_corpus_beside_the_config_is_found_and_validate_names_it(make_config, tmp_path, capsys, monkeypatch):
    (tmp_path / "corpus.txt").write_text("first document\nsecond document\n")
    path = make_config(datasets=None, pretraining_dataset=[{"path": "corpus.txt", "skip": 1}])
    monkeypatch.chdir(tmp_path.parent)  # not where the corpus is: found next to the config
    config = load_config(path, log=lambda _: None)
    assert config.pretraining_dataset[0].path == str(tmp_path / "corpus.txt")
    result = main_in_process(capsys, "validate", str(path))
    assert result.returncode == 0
    assert (f"pretraining_dataset: {tmp_path / 'corpus.txt'} (local, streamed while training, column text, "
            "skipping 1 documents)") in result.stdout


def test_inference_prompts_of_a_pretraining_run_are_text_to_continue(make_config, tmp_path):
    from axlora.inference.prompts import PromptRequest, prompt_format

    config = load_config(_pretraining(make_config, tmp_path), log=lambda _: None)
    rendered = prompt_format(config, None, None).render(PromptRequest(row={}, entry="12+35="))
    assert rendered == "12+35="
