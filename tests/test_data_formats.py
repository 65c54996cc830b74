"""Row formats and label masks: exactly which tokens each format trains, on the tiny tokenizer.

Expected ids and labels are built independently: each piece of text is tokenized on its own and marked
trained or not by hand. For chat rows the real path tokenizes the whole rendered text at once; the tests
pick texts whose pieces meet at special tokens or newlines, where both tokenizations agree.
"""

from __future__ import annotations

import pytest

from axlora.config.chat_templates import BUILTIN_TEMPLATES
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX
from axlora.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, build_format
from axlora.data.segments import RowFormatError
from axlora.data.tokenize import RowError, encode_rows

SYSTEM, USER, ASSISTANT = "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"
END = "<|im_end|>"
CONVERSATION = [
    {"role": "system", "content": "You add."},
    {"role": "user", "content": "1+2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "assistant"},  # an answer equal to a role header must not confuse the mask
    {"role": "assistant", "content": "assistant"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    """The tiny tokenizer with chatml's markers as special tokens and chatml as its own template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END]})
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
    return tokenizer


def config_with(*datasets: dict, **settings) -> Config:
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1,
        "datasets": [{"path": "/data/x.jsonl", **d} for d in datasets], **settings,
    })


def encode(config: Config, tokenizer, *rows: dict) -> list[dict[str, list[int]]]:
    fmt = build_format(config, 0, tokenizer)
    return list(encode_rows([(0, i, r) for i, r in enumerate(rows)], [fmt], tokenizer,
                            train_on_inputs=config.train_on_inputs))


def expected(tokenizer, *pieces: tuple[str, bool] | tuple[list[int], bool]) -> dict[str, list[int]]:
    ids, labels = [], []
    for text, trained in pieces:
        piece = text if isinstance(text, list) else tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": ids, "labels": labels}


# ---- text formats ----------------------------------------------------------------------------------------


def test_alpaca_masks_the_prompt_and_trains_output_and_eos(tokenizer):
    row = {"instruction": "Add the two numbers.", "input": "12+35", "output": "47"}
    [got] = encode(config_with({"type": "alpaca"}), tokenizer, row)
    prompt = ALPACA_PROMPT_WITH_INPUT.format(**row)
    assert got == expected(tokenizer, (prompt, False), ("47", True), ([tokenizer.eos_token_id], True))
    [no_input] = encode(config_with({"type": "alpaca"}), tokenizer, {**row, "input": ""})
    assert no_input == expected(
        tokenizer, (ALPACA_PROMPT_NO_INPUT.format(**row), False), ("47", True), ([tokenizer.eos_token_id], True)
    )


def test_train_on_inputs_trains_every_token(tokenizer):
    row = {"instruction": "Add the two numbers.", "input": "1+2", "output": "3"}
    [got] = encode(config_with({"type": "alpaca"}, train_on_inputs=True), tokenizer, row)
    assert got["labels"] == got["input_ids"]


def test_completion_trains_the_whole_field_then_eos(tokenizer):
    [got] = encode(config_with({"type": "completion", "field": "body"}), tokenizer, {"body": "12+35 is 47"})
    assert got == expected(tokenizer, ("12+35 is 47", True), ([tokenizer.eos_token_id], True))


def test_input_output_masks_label_false_segments_and_adds_nothing(tokenizer):
    row = {"segments": [{"text": "Q: 1+2\n", "label": False}, {"text": "A: 3", "label": True},
                        {"text": "\nnote", "label": False}]}
    [got] = encode(config_with({"type": "input_output"}), tokenizer, row)
    assert got == expected(tokenizer, ("Q: 1+2\n", False), ("A: 3", True), ("\nnote", False))


def test_pretokenized_rows_keep_labels_default_to_ids_and_drop_padding(tokenizer):
    config = config_with({})
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9]},
        {"input_ids": [10, 11, 3, 3], "attention_mask": [1, 1, 0, 0], "labels": [-100, 11, -100, -100]},
    ]
    assert encode(config, tokenizer, *rows) == [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [10, 11], "labels": [-100, 11]},
    ]


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"input_ids": [1, 2], "labels": [1]}, "labels", "has 1 values, input_ids has 2"),
    ({"input_ids": [1, 100000]}, "input_ids", "input_ids[1] = 100000 is not a token id"),
    ({"input_ids": "1 2"}, "input_ids", "must be a list of integers"),
    ({"text": "hello"}, "input_ids", "missing field 'input_ids' (rows of a dataset with no `type`"),
])
def test_pretokenized_errors_name_the_field(tokenizer, row, field, message):
    with pytest.raises(RowError) as info:
        encode(config_with({}), tokenizer, row)
    assert info.value.field == field and message in str(info.value)


def test_alpaca_missing_output_names_the_field(tokenizer):
    with pytest.raises(RowError) as info:
        encode(config_with({"type": "alpaca"}), tokenizer, {"instruction": "x"}, {"instruction": "x", "output": 5})
    assert info.value.field == "output" and info.value.position == 0 and "missing field 'output'" in str(info.value)


def test_prompts_for_samples(tokenizer, chat_tokenizer):
    alpaca = build_format(config_with({"type": "alpaca"}), 0, None)
    assert alpaca.prompt({"instruction": "Add.", "input": "1+2"}) == ALPACA_PROMPT_WITH_INPUT.format(
        instruction="Add.", input="1+2")
    chat = build_format(config_with({"type": "chat_template"}), 0, chat_tokenizer)
    assert chat.prompt("1+2") == f"{USER}1+2{END}\n{ASSISTANT}"


# ---- chat templates --------------------------------------------------------------------------------------


def chat_pieces(eos: str) -> list[tuple[str, bool]]:
    """The chatml rendering of CONVERSATION, split where the default mask changes, for ``train_on_eos``."""
    trained_end = {"turn": (True, True), "none": (False, False), "all": (True, True), "last": (False, True)}[eos]
    pieces = [
        (f"{SYSTEM}You add.", False), (END, eos == "all"), (f"\n{USER}1+2", False), (END, eos == "all"),
        (f"\n{ASSISTANT}", False), ("3", True), (END, trained_end[0]),
        (f"\n{USER}assistant", False), (END, eos == "all"),
        (f"\n{ASSISTANT}", False), ("assistant", True), (END, trained_end[1]), ("\n", False),
    ]
    return pieces


@pytest.mark.parametrize("eos", ["turn", "none", "all", "last"])
def test_chat_template_trains_assistant_content_and_end_of_turn(chat_tokenizer, eos):
    config = config_with({"type": "chat_template", "train_on_eos": eos})
    [got] = encode(config, chat_tokenizer, {"messages": CONVERSATION})
    assert got == expected(chat_tokenizer, *chat_pieces(eos))
    # the ids are exactly the tokenizer's own rendering of the conversation
    assert got["input_ids"] == chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)


def test_chat_roles_to_train_and_train_on_inputs(chat_tokenizer):
    [got] = encode(config_with({"type": "chat_template", "roles_to_train": ["user"]}), chat_tokenizer,
                   {"messages": CONVERSATION})
    assert got == expected(
        chat_tokenizer, (SYSTEM + "You add." + END + "\n" + USER, False), ("1+2" + END, True),
        (f"\n{ASSISTANT}3{END}\n{USER}", False), ("assistant" + END, True),
        (f"\n{ASSISTANT}assistant{END}\n", False),
    )
    [everything] = encode(config_with({"type": "chat_template"}, train_on_inputs=True), chat_tokenizer,
                          {"messages": CONVERSATION})
    assert everything["labels"] == everything["input_ids"]


def test_sharegpt_and_property_mappings_map_onto_chat_template(chat_tokenizer):
    plain = encode(config_with({"type": "chat_template"}), chat_tokenizer, {"messages": CONVERSATION})
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    conversations = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    assert encode(config_with({"type": "sharegpt"}), chat_tokenizer, {"conversations": conversations}) == plain
    mapped = config_with({"type": "chat_template", "field_messages": "dialog",
                          "message_property_mappings": {"role": "speaker", "content": "text"},
                          "roles": {"user": ["q"], "assistant": ["a"], "system": ["system"]}})
    names = {"system": "system", "user": "q", "assistant": "a"}
    dialog = [{"speaker": names[m["role"]], "text": m["content"]} for m in CONVERSATION]
    assert encode(mapped, chat_tokenizer, {"dialog": dialog}) == plain


def test_message_field_training_overrides_the_role(chat_tokenizer):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["train"] = False
    config = config_with({"type": "chat_template", "message_field_training": "train"})
    [got] = encode(config, chat_tokenizer, {"messages": messages})
    trained = [t for t, label in zip(got["input_ids"], got["labels"], strict=True) if label != IGNORE_INDEX]
    assert chat_tokenizer.decode(trained) == "assistant" + END


def test_builtin_template_with_trim_and_a_text_end_marker(tokenizer):
    """llama3 trims content; its <|eot_id|> is plain text to this tokenizer and is trained all the same."""
    config = config_with({"type": "chat_template", "chat_template": "llama3"})
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": " 3 "}]
    [got] = encode(config, tokenizer, {"messages": messages})
    trained = [t for t, label in zip(got["input_ids"], got["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "3<|eot_id|>"
    rendered = tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES["llama3"], tokenize=False)
    assert tokenizer.decode(got["input_ids"]) == rendered


def test_template_choice_order(chat_tokenizer):
    """Dataset chat_template wins over the top-level one, which wins over the tokenizer's."""
    row = {"messages": CONVERSATION[1:3]}
    own = encode(config_with({"type": "chat_template"}), chat_tokenizer, row)[0]
    top = encode(config_with({"type": "chat_template"}, chat_template="phi_3"), chat_tokenizer, row)[0]
    both = encode(config_with({"type": "chat_template", "chat_template": "chatml"}, chat_template="phi_3"),
                  chat_tokenizer, row)[0]
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    custom = encode(config_with({"type": "chat_template", "chat_template_jinja": jinja}), chat_tokenizer, row)[0]
    assert chat_tokenizer.decode(top["input_ids"]).startswith("<|user|>\n1+2<|end|>")
    assert both == own
    assert chat_tokenizer.decode(custom["input_ids"]) == "user: 1+2\nassistant: 3\n"


def test_tokenizer_without_a_template_needs_one_named(tokenizer):
    with pytest.raises(UserError, match=r"datasets\[0\] .*the tokenizer has no chat template.*chatml"):
        build_format(config_with({"type": "chat_template"}), 0, tokenizer)


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"conversation": []}, "messages", "missing field 'messages'"),
    ({"messages": []}, "messages", "must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "is a 'image_url' part; only text parts"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be text or a list of text parts"),
    ({"messages": [{"content": "a"}]}, "messages[0].role", "has no text field 'role'"),
])
def test_chat_row_errors_name_the_field(chat_tokenizer, row, field, message):
    with pytest.raises(RowError) as info:
        encode(config_with({"type": "chat_template"}), chat_tokenizer, row)
    assert info.value.field == field and message in str(info.value)


def test_template_that_rewrites_trained_content_is_refused(chat_tokenizer):
    jinja = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}"
    fmt = build_format(config_with({"type": "chat_template", "chat_template": jinja}), 0, chat_tokenizer)
    with pytest.raises(RowFormatError, match="does not render the content of message 1 as written"):
        fmt.segments({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}]})


def test_unknown_type_and_template_names_are_config_errors(tmp_path):
    from axlora.config.load import load_config
    from axlora.core.errors import ConfigError

    path = tmp_path / "c.yml"
    path.write_text("base_model: /m\nlora_target_linear: true\nmax_steps: 1\ndatasets:\n  - path: /d.jsonl\n"
                    "    type: alpacca\n  - path: /e.jsonl\n    type: chat_template\n    chat_template: chatmll\n"
                    "  - path: /f.jsonl\n    type: alpaca\n    field_messages: m\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert ":6: datasets[0].type:" in text and "unknown type 'alpacca' (did you mean 'alpaca'?)" in text
    assert "unknown chat template 'chatmll' (did you mean 'chatml'?)" in text
    assert ":12: datasets[2].field_messages:" in text and "not used by type alpaca" in text


def test_fast_encoding_equals_the_tokenizer_call(chat_tokenizer):
    from axlora.data.tokenize import encode_texts

    texts = ["Add 12+35.\n", "", " leading space", f"{USER}hi{END}", "x" * 300]
    assert encode_texts(chat_tokenizer, texts) == chat_tokenizer(texts, add_special_tokens=False)["input_ids"]
