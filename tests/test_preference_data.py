"""Axolotl's preference dataset types read, rendered and tokenized: the prompt shared by both answers, each
answer with its end-of-turn marker, sequence_len applied, and bad rows named by file and line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from axlora.config.chat_templates import BUILTIN_TEMPLATES
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.preference_demo import addition_judgements, addition_pairs, alpaca_addition_pairs
from axlora.data.preference_prepare import prepare_preferences


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def config_for(tmp_path, rows, kind, rl="dpo", **keys) -> Config:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = keys.pop("dataset", {})
    return Config(base_model="axlora:tiny-llama", lora_target_linear=True, max_steps=1, rl=rl,
                  datasets=[{"path": str(path), "type": kind, **dataset}], **{"sequence_len": 128, **keys})


def decoded(tokenizer, row, key):
    return tokenizer.decode(row[key])


def test_chat_template_pairs_share_the_prompt(tmp_path, tokenizer):
    data = prepare_preferences(config_for(tmp_path, addition_pairs(10), "chat_template.default", val_set_size=2),
                               tokenizer, log=lambda line: None)
    assert len(data.train) == 8 and len(data.val) == 2
    row = data.train[0]
    prompt = decoded(tokenizer, row, "prompt_ids")
    assert prompt.startswith("<|im_start|>user\nAdd the two numbers.") and prompt.endswith("<|im_start|>assistant\n")
    chosen, rejected = decoded(tokenizer, row, "chosen_ids"), decoded(tokenizer, row, "rejected_ids")
    a, b = prompt.split("\n")[2].split("<|im_end|>")[0].split("+")
    assert chosen == f"{int(a) + int(b)}<|im_end|>\n" and rejected != chosen and rejected.endswith("<|im_end|>\n")


@pytest.mark.parametrize("kind, row", [
    ("chatml.intel", {"system": "Be brief.", "question": "Q?", "chosen": "yes", "rejected": "no"}),
    ("llama3.argilla", {"instruction": "Q?", "chosen_response": "yes", "rejected_response": "no"}),
    ("chatml.ultra", {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"},
                                                 {"role": "assistant", "content": "yes"}],
                      "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}]}),
    ("user_defined.default", {"prompt": "Q?", "chosen": "yes", "rejected": "no"}),
    # Axolotl's argilla_chat reads the first exchange only: later turns are not part of the pair
    ("llama3.argilla_chat", {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"},
                                        {"role": "user", "content": "more?"}, {"role": "assistant", "content": "x"}],
                             "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}]}),
])
def test_axolotl_pair_types(tmp_path, tokenizer, kind, row):
    [out] = prepare_preferences(config_for(tmp_path, [row], kind), tokenizer, log=lambda line: None).train
    prompt = decoded(tokenizer, out, "prompt_ids")
    assert "Q?" in prompt and decoded(tokenizer, out, "chosen_ids").startswith("yes")
    assert decoded(tokenizer, out, "rejected_ids").startswith("no")
    if kind.startswith("llama3"):
        assert "<|start_header_id|>assistant<|end_header_id|>" in prompt
    if kind.endswith("argilla_chat"):
        assert "more?" not in prompt and decoded(tokenizer, out, "chosen_ids").startswith("yes<|eot_id|>")
    if kind == "chatml.intel":
        assert prompt.startswith("<|im_start|>system\nBe brief.")
    if kind == "user_defined.default":
        assert decoded(tokenizer, out, "chosen_ids") == "yes</s>"


def test_orpo_argilla_conversations(tmp_path, tokenizer):
    """chat_template.argilla (Axolotl's ORPO type): the prompt is the chosen conversation up to its last answer."""
    turns = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."},
             {"role": "user", "content": "Q2?"}]
    row = {"system": "Be brief.", "prompt": "Q2?", "chosen": [*turns, {"role": "assistant", "content": "yes"}],
           "rejected": [*turns, {"role": "assistant", "content": "no"}]}
    [out] = prepare_preferences(config_for(tmp_path, [row], "chat_template.argilla", rl="orpo", sequence_len=512),
                                tokenizer, log=lambda line: None).train
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *turns],
                                             chat_template=BUILTIN_TEMPLATES["chatml"], add_generation_prompt=True,
                                             tokenize=False)
    assert decoded(tokenizer, out, "prompt_ids") == expected
    assert decoded(tokenizer, out, "chosen_ids") == "yes<|im_end|>\n"
    assert decoded(tokenizer, out, "rejected_ids") == "no<|im_end|>\n"
    odd = {**row, "rejected": turns}
    with pytest.raises(UserError, match="field 'rejected' must be a conversation"):
        prepare_preferences(config_for(tmp_path, [odd], "chat_template.argilla", rl="orpo"), tokenizer,
                            log=lambda line: None)
    with pytest.raises(ValueError, match="type chat_template.argilla is not a dpo format"):
        config_for(tmp_path, [row], "chat_template.argilla", rl="dpo")


def test_kto_rows_keep_their_label_and_a_mismatched_completion(tmp_path, tokenizer):
    logged = []
    data = prepare_preferences(config_for(tmp_path, addition_judgements(6), "chatml.ultra", rl="kto", val_set_size=2),
                               tokenizer, log=logged.append)
    assert sorted(row["label"] for row in data.train + data.val) == [False, False, False, True, True, True]
    assert all("rejected_ids" not in row for row in data.train)
    assert "3 desirable / 3 undesirable completions" in logged[-1]
    for rows in (data.train, data.val):  # the KL estimate: each prompt with the next row's completion
        for index, row in enumerate(rows):
            assert row["kl_ids"] == rows[(index + 1) % len(rows)]["chosen_ids"]
            assert row["kl_ids"] != row["chosen_ids"] or len(rows) == 1


@pytest.mark.parametrize("kind, row, dataset", [
    ("chatml.argilla", {"system": "Be brief.", "instruction": "Q?", "completion": "yes", "label": True}, {}),
    ("llama3.argilla_chat", {"completion": [{"role": "user", "content": "Q?"},
                                            {"role": "assistant", "content": "yes"}], "label": True}, {}),
    ("chatml.intel", {"question": "Q?", "completion": "yes", "label": True}, {}),
    ("llama3.prompt_pairs", {"prompt": "Q?", "completion": "yes", "label": True}, {}),
    ("chatml.ultra", {"system": "Be brief.", "prompt": "Q?", "completion": "yes", "label": True}, {}),
    ("user_defined.default", {"q": "Q?", "a": "yes", "good": True},
     {"field_prompt": "q", "field_completion": "a", "field_label": "good"}),
])
def test_axolotl_kto_types(tmp_path, tokenizer, kind, row, dataset):
    bad = {key: value for key, value in row.items() if key not in {"label", "good"}}
    [out] = prepare_preferences(config_for(tmp_path, [row], kind, rl="kto", dataset=dataset), tokenizer,
                                log=lambda line: None).train
    prompt = decoded(tokenizer, out, "prompt_ids")
    assert "Q?" in prompt and decoded(tokenizer, out, "chosen_ids").startswith("yes") and out["label"] is True
    assert ("system\nBe brief." in prompt) == ("system" in row)
    if kind.startswith("llama3"):
        assert "<|start_header_id|>assistant<|end_header_id|>" in prompt
    if kind.endswith("argilla_chat"):
        assert "more?" not in prompt and decoded(tokenizer, out, "chosen_ids").startswith("yes<|eot_id|>")
    with pytest.raises(UserError, match="must be true \\(desirable\\) or false"):
        prepare_preferences(config_for(tmp_path, [bad], kind, rl="kto", dataset=dataset), tokenizer,
                            log=lambda line: None)


def test_bad_rows_are_named_in_file_order(tmp_path, tokenizer):
    rows = [{"question": "Q", "chosen": "a", "rejected": "b"}, {"question": "Q", "chosen": "a"}, {"chosen": "a"}]
    with pytest.raises(UserError) as caught:
        prepare_preferences(config_for(tmp_path, rows, "chatml.intel"), tokenizer, log=lambda line: None)
    text = str(caught.value)
    assert "2 rows cannot be used" in text and "prefs.jsonl:2" in text and "prefs.jsonl:3" in text
    assert text.index("prefs.jsonl:2") < text.index("prefs.jsonl:3") and "missing field 'rejected'" in text


def test_sequence_len_drops_or_truncates_the_answers(tmp_path, tokenizer):
    rows = [{"prompt": "Q?", "chosen": "y" * 200, "rejected": "n"}, {"prompt": "Q?", "chosen": "y", "rejected": "n"}]
    data = prepare_preferences(config_for(tmp_path, rows, "user_defined.default"), tokenizer, log=lambda line: None)
    assert len(data.train) == 1 and data.report["dropped_over_sequence_len"] == 1
    cut = prepare_preferences(config_for(tmp_path, rows, "user_defined.default", excess_length_strategy="truncate"),
                              tokenizer, log=lambda line: None)
    assert len(cut.train) == 2 and max(len(row["input_ids"]) for row in cut.train) == 128
    with pytest.raises(UserError, match="prefs.jsonl:1: row 1: prompt \\+ answer is 203 tokens"):
        prepare_preferences(config_for(tmp_path, rows, "user_defined.default", excess_length_strategy="raise"),
                            tokenizer, log=lambda line: None)


def test_preprocess_reads_and_reports_preference_rows(capsys, tmp_path, tiny_model_dir):
    from conftest import main_in_process

    rows = tmp_path / "prefs.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in addition_pairs(6)) + '{"messages": []}\n')
    config = {"base_model": str(tiny_model_dir), "lora_target_linear": True, "max_steps": 1, "rl": "dpo",
              "sequence_len": 128, "datasets": [{"path": str(rows), "type": "chat_template.default"}]}
    path = tmp_path / "prefs.yml"
    path.write_text(json.dumps(config))
    bad = main_in_process(capsys, "preprocess", str(path))
    assert bad.returncode == 2 and "prefs.jsonl:7" in bad.stderr and "non-empty list of messages" in bad.stderr
    rows.write_text("".join(json.dumps(row) + "\n" for row in addition_pairs(6)))
    ok = main_in_process(capsys, "preprocess", str(path))
    assert ok.returncode == 0 and "prepared 6 train / 0 val preference rows (dpo)" in ok.stdout


def test_the_demo_pairs_are_the_generated_ones():
    """examples/data/addition-pairs.jsonl is what its config says generated it (numbers 25 to 59)."""
    from conftest import REPO

    rows = [json.loads(line) for line in (REPO / "examples" / "data" / "addition-pairs.jsonl").read_text().splitlines()]
    assert rows == alpaca_addition_pairs(512, numbers=(25, 59))
    assert min(int(n) for row in rows for n in row["prompt"].split("### Input:\n")[1].split("\n")[0].split("+")) == 25
