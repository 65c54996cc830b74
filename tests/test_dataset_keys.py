"""Axolotl's dataset-level chat keys with their meaning: tools, reasoning, system column, template kwargs,
end-of-turn tokens, shards, sharegpt's conversation; and the keys axlora refuses, by name."""

from __future__ import annotations

import json

import pytest

from axlora.config.chat_templates import BUILTIN_TEMPLATES
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX
from axlora.data.formats import build_format
from axlora.data.sources import load_source
from axlora.data.tokenize import encode_rows

END = "<|im_end|>"
# A chatml variant that renders tools, reasoning, tool calls and an enable_thinking switch
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}"
    "{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END]})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def config_with(dataset: dict, **settings) -> Config:
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1,
        "datasets": [{"path": "/data/x.jsonl", "type": "chat_template", **dataset}], **settings,
    })


def rendered_and_trained(config: Config, tokenizer, row: dict) -> tuple[str, str]:
    fmt = build_format(config, 0, tokenizer)
    [got] = list(encode_rows([(0, 0, row)], [fmt], tokenizer, train_on_inputs=False))
    trained = [t for t, label in zip(got["input_ids"], got["labels"], strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(got["input_ids"]), tokenizer.decode(trained)


def test_field_tools_passes_parsed_definitions_and_tool_calls_are_trained(chat_tokenizer):
    tools = json.dumps([{"type": "function", "function": {"name": "w", "parameters": '{"type": "object"}'}}])
    call = {"type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}
    row = {"functions": tools, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]}
    text, trained = rendered_and_trained(config_with({"field_tools": "functions"}), chat_tokenizer, row)
    assert text.startswith('<|im_start|>system\nTOOLS:[{"type": "function", "function": {"name": "w", '
                           '"parameters": {"type": "object"}}}]<|im_end|>')
    assert trained == f'<tool_call>{{"name": "w", "arguments": {{"city": "Paris"}}}}</tool_call>{END}Sunny.{END}'
    # the default column is `tools`
    text, _ = rendered_and_trained(config_with({}), chat_tokenizer, {**row, "tools": tools})
    assert "TOOLS:" in text


@pytest.mark.parametrize(("dataset", "message"), [
    ({}, {"role": "assistant", "content": "4", "reasoning_content": "2+2"}),
    ({"field_thinking": "thought"}, {"role": "assistant", "content": "4", "thought": "2+2"}),
    ({"split_thinking": True}, {"role": "assistant", "content": "<think>2+2</think>\n4"}),
])
def test_reasoning_reaches_the_template_and_is_trained_with_the_answer(chat_tokenizer, dataset, message):
    row = {"messages": [{"role": "user", "content": "2+2?"}, message]}
    text, trained = rendered_and_trained(config_with(dataset), chat_tokenizer, row)
    assert text.endswith(f"<|im_start|>assistant\n<think>\n2+2\n</think>\n\n4{END}\n")
    assert trained == f"<think>\n2+2\n</think>\n\n4{END}"


def test_template_thinking_key_names_the_key_the_template_reads(chat_tokenizer):
    template = TEMPLATE.replace("m.reasoning_content", "m.reasoning")
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]}
    config = config_with({"chat_template": template, "template_thinking_key": "reasoning"})
    _, trained = rendered_and_trained(config, chat_tokenizer, row)
    assert trained == f"<think>\nr\n</think>\n\na{END}"


def test_system_column_and_drop_system_message(chat_tokenizer):
    row = {"system": "Be brief.", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    text, _ = rendered_and_trained(config_with({}), chat_tokenizer, row)
    assert text.startswith(f"<|im_start|>system\nBe brief.{END}\n<|im_start|>user\nq")
    text, _ = rendered_and_trained(config_with({"drop_system_message": True}), chat_tokenizer, row)
    assert text.startswith("<|im_start|>user\nq")
    text, _ = rendered_and_trained(config_with({"field_system": "none_here"}), chat_tokenizer, row)
    assert text.startswith("<|im_start|>user\nq")


def test_chat_template_kwargs_reach_the_template(chat_tokenizer):
    plain = build_format(config_with({}), 0, chat_tokenizer)
    off = build_format(config_with({}, chat_template_kwargs={"enable_thinking": False}), 0, chat_tokenizer)
    assert plain.prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off.prompt("hi") == plain.prompt("hi") + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize(("eos", "eot", "expected"), [
    ("turn", None, f"3{END}"),
    ("none", "turn", f"3{END}"),
    ("turn", "none", "3"),
    ("none", None, "3"),
])
def test_eot_tokens_and_train_on_eot(chat_tokenizer, eos, eot, expected):
    row = {"messages": [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]}
    config = config_with({"train_on_eos": eos, "train_on_eot": eot}, eot_tokens=[END])
    assert rendered_and_trained(config, chat_tokenizer, row)[1] == expected


def test_an_end_marker_that_is_not_one_token_warns_and_fails_under_strict(plain_tokenizer):
    fmt = build_format(config_with({"chat_template": "chatml"}), 0, plain_tokenizer)
    [warning] = fmt.warnings
    assert "end-of-turn marker '<|im_end|>' of built-in template 'chatml' is" in warning and "not one" in warning
    with pytest.raises(UserError, match="not one.*strict: true"):
        build_format(config_with({"chat_template": "chatml"}, strict=True), 0, plain_tokenizer)
    custom = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    # a custom chatml template gets its end marker trained (as text) and the same warning
    assert build_format(config_with({"chat_template": custom}), 0, plain_tokenizer).warnings
    assert rendered_and_trained(config_with({"chat_template": custom}), plain_tokenizer, row)[1] == f"a{END}"


def test_shards_keep_one_contiguous_shard(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": str(n)}) + "\n" for n in range(10)))
    from axlora.config.datasets import DatasetConfig

    rows = load_source(DatasetConfig(path=str(path), type="completion", shards=3, shards_idx=1), seed=0).rows
    assert [r["text"] for r in rows] == ["4", "5", "6"]


def test_sharegpt_conversation_names_the_template(plain_tokenizer):
    config = config_with({"type": "sharegpt", "conversation": "chatml"})
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    text, trained = rendered_and_trained(config, plain_tokenizer, row)
    assert text == plain_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        chat_template=BUILTIN_TEMPLATES["chatml"], tokenize=False)
    assert trained == f"a{END}"


@pytest.mark.parametrize(("dataset", "message"), [
    ({"type": "sharegpt", "conversation": "vicuna_v1.1"}, "conversation 'vicuna_v1.1' has no axlora template"),
    ({"type": "alpaca:chat"}, "type 'alpaca:chat' is one of Axolotl's older prompt strategies"),
    ({"type": "alpaca_chat.load_qa"}, "older prompt strategies"),
    ({"type": "alpaca", "field_tools": "t"}, "not used by type alpaca"),
    ({"type": "completion", "shards": 2, "shards_idx": 2}, "shards_idx must be below shards"),
    ({"type": "sharegpt", "field_human": "human"}, "c.yml:3: datasets[0].field_human: the old sharegpt field names are not supported"),
    ({"type": "alpaca", "type_of": 1}, "unknown key 'datasets[0].type_of'"),
])
def test_refused_dataset_keys_are_named(tmp_path, dataset, message):
    from axlora.config.load import load_config
    from axlora.core.errors import ConfigError

    path = tmp_path / "c.yml"
    import yaml

    path.write_text(yaml.safe_dump({"base_model": "/m", "lora_target_linear": True, "max_steps": 1,
                                    "datasets": [{"path": "/d.jsonl", **dataset}]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in "\n".join(info.value.problems)


def test_an_axolotl_dataset_entry_loads(tmp_path):
    from axlora.config.load import load_config

    path = tmp_path / "c.yml"
    path.write_text(
        "base_model: /m\nlora_target_linear: true\nmax_steps: 1\neot_tokens: ['<|im_end|>']\n"
        "chat_template_kwargs: {enable_thinking: false}\ndatasets:\n  - path: /d.jsonl\n    type: chat_template\n"
        "    field_messages: conversations\n    message_field_role: from\n    message_field_content: value\n"
        "    roles_to_train: [gpt]\n    train_on_eot: turn\n    field_tools: tools\n    field_system: system\n"
        "    drop_system_message: false\n    field_thinking: reasoning_content\n    split_thinking: true\n"
        "    template_thinking_key: reasoning_content\n    shards: 2\n"
    )
    config = load_config(path)
    assert config.eot_tokens == ["<|im_end|>"] and config.datasets[0].message_field_role == "from"
