"""Role names as Axolotl resolves them, datasets that would train nothing, and empty assistant turns."""

from __future__ import annotations

import json

import pytest

from axlora.config.chat_templates import BUILTIN_TEMPLATES
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX
from axlora.data.formats import build_format
from axlora.data.prepare import prepare_data
from axlora.data.tokenize import encode_rows
from axlora.model.tokenizer import tokenizer_fingerprint

from conftest import main_in_process

END = "<|im_end|>"
SHAREGPT = [
    {"from": "system", "value": "You add."},
    {"from": "human", "value": "1+2"},
    {"from": "gpt", "value": "3"},
    {"from": "human", "value": "2+2"},
    {"from": "gpt", "value": "4"},
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END]})
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tokenizer


def config_with(*datasets: dict, tmp_path=None, **settings) -> Config:
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1,
        "output_dir": str(tmp_path / "out") if tmp_path else "./out",
        "datasets": [{"path": "/data/x.jsonl", **d} for d in datasets], **settings,
    })


def trained_text(config: Config, tokenizer, row: dict) -> str:
    fmt = build_format(config, 0, tokenizer)
    [got] = list(encode_rows([(0, 0, row)], [fmt], tokenizer, train_on_inputs=False))
    return tokenizer.decode([t for t, label in zip(got["input_ids"], got["labels"], strict=True) if label != IGNORE_INDEX])


@pytest.mark.parametrize("dataset", [
    {"type": "chat_template", "field_messages": "conversations",
     "message_property_mappings": {"role": "from", "content": "value"}},
    {"type": "chat_template", "field_messages": "conversations", "message_field_role": "from",
     "message_field_content": "value"},
    {"type": "sharegpt"},
])
@pytest.mark.parametrize("roles_to_train", [["gpt"], ["assistant"]])
def test_roles_to_train_go_through_the_role_mapping(chat_tokenizer, dataset, roles_to_train):
    config = config_with({**dataset, "roles_to_train": roles_to_train})
    assert trained_text(config, chat_tokenizer, {"conversations": SHAREGPT}) == f"3{END}4{END}"


def test_human_trains_the_user_turns_and_a_custom_mapping_applies_to_roles_to_train(chat_tokenizer):
    config = config_with({"type": "sharegpt", "roles_to_train": ["human"]})
    assert trained_text(config, chat_tokenizer, {"conversations": SHAREGPT}) == f"1+2{END}2+2{END}"
    custom = config_with({"type": "sharegpt", "roles": {"user": ["q"], "assistant": ["a"]}, "roles_to_train": ["a"]})
    row = {"conversations": [{"from": "q", "value": "hi"}, {"from": "a", "value": "yo"}]}
    assert trained_text(custom, chat_tokenizer, row) == f"yo{END}"


def test_default_mapping_covers_model_function_call_and_observation(chat_tokenizer):
    """LLaMA-Factory's sharegpt names: function_call is an assistant turn, observation a tool result."""
    row = {"conversations": [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "model", "value": "It is sunny."},
    ]}
    config = config_with({"type": "sharegpt"})
    fmt = build_format(config, 0, chat_tokenizer)
    text = "".join(s.text for s in fmt.segments(row))
    assert "<|im_start|>assistant\n{\"name\": \"w\"}" in text and "<|im_start|>tool\nsunny" in text
    assert "<|im_start|>assistant\nIt is sunny." in text
    assert trained_text(config, chat_tokenizer, row) == f'{{"name": "w"}}{END}It is sunny.{END}'


def test_empty_assistant_turn_is_not_trained_and_is_counted(chat_tokenizer):
    config = config_with({"type": "chat_template"})
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    assert trained_text(config, chat_tokenizer, {"messages": messages}) == f"c{END}"
    fmt = build_format(config, 0, chat_tokenizer)
    assert fmt.segments({"messages": messages}).empty_turns == 1


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(count: int, long: int = 0):
    rows = [{"conversations": [{"from": "human", "value": f"q{n}"}, {"from": "gpt", "value": f"a{n}"}]}
            for n in range(count)]
    rows += [{"conversations": [{"from": "human", "value": "x " * 200}, {"from": "gpt", "value": "y"}]}] * long
    return rows


def test_a_dataset_that_trains_nothing_is_named_with_its_counts_even_when_mixed(tmp_path, chat_tokenizer, alpaca_file):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(5, long=2))
    datasets = [{"path": str(alpaca_file), "type": "alpaca"},
                {"path": str(chats), "type": "sharegpt", "roles_to_train": ["tool"]}]
    config = config_with(*datasets, tmp_path=tmp_path, sequence_len=64, chat_template="chatml")
    with pytest.raises(UserError) as info:
        prepare_data(config, chat_tokenizer, tokenizer_fingerprint(chat_tokenizer), log=lambda line: None)
    assert str(info.value) == (
        f"datasets[1] ({chats}) adds no trainable sample: of 7 rows, 2 were too long for sequence_len 64 and 5 had "
        "nothing to train; check roles_to_train ['tool'] against the roles the data uses."
    )
    fixed = config.model_copy(update={"datasets": [config.datasets[0], config.datasets[1].model_copy(
        update={"roles_to_train": ["gpt"]})]})
    prepared = prepare_data(fixed, chat_tokenizer, tokenizer_fingerprint(chat_tokenizer), log=lambda line: None)
    assert prepared.report["datasets"][1]["train_rows"] == 5


def test_preprocess_exits_2_naming_the_untrained_dataset(make_config, tmp_path, capsys):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(4))
    path = make_config(datasets=[{"path": str(chats), "type": "sharegpt", "roles_to_train": ["tool"]}],
                       chat_template="chatml")
    result = main_in_process(capsys, "preprocess", str(path))
    assert result.returncode == 2
    assert "adds no trainable sample: of 4 rows, 0 were too long for sequence_len 96 and 4 had nothing" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_report_counts_empty_turns(tmp_path, chat_tokenizer):
    from axlora.data.report import format_summary

    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}] * 3
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    config = config_with({"path": str(path), "type": "chat_template"}, tmp_path=tmp_path, chat_template="chatml")
    report = prepare_data(config, chat_tokenizer, tokenizer_fingerprint(chat_tokenizer), log=lambda line: None).report
    assert report["datasets"][0]["empty_turns"] == 3 and report["empty_turns"] == 3
    assert "; 3 empty turns not trained" in format_summary(report, False)[1]
