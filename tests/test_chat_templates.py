"""The chat-template catalog (Axolotl's built-in names): each family's format on a multi-turn conversation
with a system message, tools and tool messages where the family has them, and the masks it trains."""

from __future__ import annotations

import pytest

from axlora.config.chat_template_catalog import CATALOG
from axlora.config.chat_templates import BUILTIN_END_OF_TURN, BUILTIN_TEMPLATES
from axlora.config.schema import Config
from axlora.core.names import IGNORE_INDEX
from axlora.data.formats import build_format
from axlora.data.tokenize import encode_rows

CONVERSATION = [
    {"role": "system", "content": "You add."},
    {"role": "user", "content": "1+2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": " 2+2 "},
    {"role": "assistant", "content": "4"},
]
NO_SYSTEM = ("mistral_v1", "mistral_v2v3", "mistral_v3_tekken")  # these formats have no system turn
# The tiny tokenizer's BOS is <s> and its EOS </s>.
EXPECTED = {
    "qwen_25": "<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n3"
    "<|im_end|>\n<|im_start|>user\n 2+2 <|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "qwen3": "<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n3"
    "<|im_end|>\n<|im_start|>user\n 2+2 <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n",
    "qwen3_5": "<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n3"
    "<|im_end|>\n<|im_start|>user\n 2+2 <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n",
    "mistral_v1": "<s> [INST] 1+2 [/INST] 3</s> [INST]  2+2  [/INST] 4</s>",
    "mistral_v2v3": "<s>[INST] 1+2[/INST] 3</s>[INST]  2+2 [/INST] 4</s>",
    "mistral_v3_tekken": "<s>[INST]1+2[/INST]3</s>[INST] 2+2 [/INST]4</s>",
    "mistral_v7_tekken": "<s>[SYSTEM_PROMPT]You add.[/SYSTEM_PROMPT][INST]1+2[/INST]3</s>[INST] 2+2 [/INST]4</s>",
    "gemma3": "<s><start_of_turn>user\nYou add.\n\n1+2<end_of_turn>\n<start_of_turn>model\n3<end_of_turn>\n"
    "<start_of_turn>user\n2+2<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "gemma4": "<s><|turn>system\nYou add.<turn|>\n<|turn>user\n1+2<turn|>\n<|turn>model\n3<turn|>\n"
    "<|turn>user\n2+2<turn|>\n<|turn>model\n4<turn|>\n",
    "gemma4_unified": "<s><|turn>system\nYou add.<turn|>\n<|turn>user\n1+2<turn|>\n<|turn>model\n3<turn|>\n"
    "<|turn>user\n2+2<turn|>\n<|turn>model\n4<turn|>\n",
    "cohere": "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You add.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
    "<|USER_TOKEN|>1+2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>3<|END_OF_TURN_TOKEN|>"
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>2+2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>4"
    "<|END_OF_TURN_TOKEN|>",
    "deepseek_v2": "<s>You add.\n\n<｜User｜>1+2<｜Assistant｜>3</s><｜User｜> 2+2 <｜Assistant｜>4</s>",
    "deepseek_v3": "<s>You add.<｜User｜>1+2<｜Assistant｜>3<｜end▁of▁sentence｜><｜User｜> 2+2 <｜Assistant｜>4"
    "<｜end▁of▁sentence｜>",
    "llama4": "<s><|header_start|>system<|header_end|>\n\nYou add.<|eot|><|header_start|>user<|header_end|>\n\n1+2"
    "<|eot|><|header_start|>assistant<|header_end|>\n\n3<|eot|><|header_start|>user<|header_end|>\n\n 2+2 <|eot|>"
    "<|header_start|>assistant<|header_end|>\n\n4<|eot|>",
    "phi_35": "<|system|>\nYou add.<|end|>\n<|user|>\n1+2<|end|>\n<|assistant|>\n3<|end|>\n<|user|>\n 2+2 <|end|>\n"
    "<|assistant|>\n4<|end|>\n",
    "phi_4": "<|im_start|>system<|im_sep|>You add.<|im_end|><|im_start|>user<|im_sep|>1+2<|im_end|><|im_start|>"
    "assistant<|im_sep|>3<|im_end|><|im_start|>user<|im_sep|> 2+2 <|im_end|><|im_start|>assistant<|im_sep|>4"
    "<|im_end|>",
    "llama3_2_vision": "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\nYou add.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n1+2<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n 2+2 "
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "alpaca": "<s>You add.\n\n### Instruction:\n1+2\n\n### Response:\n3</s>\n\n### Instruction:\n 2+2 \n\n"
    "### Response:\n4</s>",
    "jamba": "<|startoftext|><|bom|><|system|> You add.<|eom|><|bom|><|user|> 1+2<|eom|><|bom|><|assistant|> 3<|eom|>"
    "<|bom|><|user|>  2+2 <|eom|><|bom|><|assistant|> 4<|eom|>",
    "metharme": "<s><|system|>You add.<|user|>1+2<|model|>3<|user|>2+2<|model|>4</s>",
    "exaone": "[|system|]You add.[|endofturn|]\n[|user|]1+2\n[|assistant|]3[|endofturn|]\n[|user|] 2+2 \n"
    "[|assistant|]4[|endofturn|]\n",
    "falcon_h1": "<s><|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n<|im_start|>"
    "assistant\n3<|im_end|>\n<|im_start|>user\n 2+2 <|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "gemma3n": "<s><start_of_turn>user\nYou add.\n\n1+2<end_of_turn>\n<start_of_turn>model\n3<end_of_turn>\n"
    "<start_of_turn>user\n2+2<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
}
KWARGS = {"date_string": "26 Jul 2024"}  # llama3_2_vision writes today's date unless given one
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
WITH_TOOLS = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "22C"},
    {"role": "assistant", "content": "Sunny, 22C."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def render(tokenizer, name: str, messages, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES[name], tools=tools, tokenize=False,
                                         **KWARGS)


def test_every_catalog_name_has_an_expected_rendering():
    assert set(EXPECTED) == set(CATALOG)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalog_template_renders_the_family_format(tokenizer, name):
    messages = CONVERSATION[1:] if name in NO_SYSTEM else CONVERSATION
    assert render(tokenizer, name, messages) == EXPECTED[name]


def test_qwen_25_renders_tools_calls_and_grouped_tool_responses(tokenizer):
    assert render(tokenizer, "qwen_25", WITH_TOOLS, TOOLS) == (
        "<|im_start|>system\nYou help.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "weather", "description": "Weather of a city", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return '
        "a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n'
        "Weather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
        "<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nSunny, 22C.<|im_end|>\n"
    )


def test_llama4_renders_tools_in_the_first_user_message_and_ipython_turns(tokenizer):
    text = render(tokenizer, "llama4", WITH_TOOLS, TOOLS)
    assert text.startswith("<s><|header_start|>system<|header_end|>\n\nEnvironment: ipython\nYou help.<|eot|>"
                           "<|header_start|>user<|header_end|>\n\nGiven the following functions, please respond with "
                           "a JSON for a function call with its proper arguments")
    assert text.endswith(
        'Weather in Paris?<|eot|><|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>'
        '{"name": "weather", "parameters": {"city": "Paris"}}<|eot|><|header_start|>ipython<|header_end|>\n\n'
        '"sunny"<|eot|><|header_start|>ipython<|header_end|>\n\n"22C"<|eot|><|header_start|>assistant'
        "<|header_end|>\n\nSunny, 22C.<|eot|>"
    )


def test_qwen3_keeps_reasoning_of_the_last_answer_and_honours_enable_thinking(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "r1"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "r2"}]
    assert render(tokenizer, "qwen3", messages).endswith(
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\n6<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], chat_template=BUILTIN_TEMPLATES["qwen3"], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_gemma4_unified_joins_assistant_messages_and_drops_their_thinking(tokenizer):
    """Axolotl's gemma4_unified: a developer message as text parts, consecutive assistant messages in one model
    turn, thinking channels left out of the answers, and Gemma 4's thought channel on an open model turn."""
    messages = [{"role": "developer", "content": [{"type": "text", "text": " Be brief. "},
                                                  {"type": "text", "text": "Add."}]},
                {"role": "user", "content": "1+2"},
                {"role": "assistant", "content": "<|channel>thought\nsmall sum<channel|>3"},
                {"role": "assistant", "content": " Done. "},
                {"role": "user", "content": "2+2"}]
    template = BUILTIN_TEMPLATES["gemma4_unified"]
    assert tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True) == (
        "<s><|turn>system\nBe brief. Add. <turn|>\n<|turn>user\n1+2<turn|>\n<|turn>model\n3<turn|>\nDone.<turn|>\n"
        "<|turn>user\n2+2<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert tokenizer.apply_chat_template(messages[1:2], chat_template=template, tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True) == (
        "<s><|turn>system\n<|think|>\n<turn|>\n<|turn>user\n1+2<turn|>\n<|turn>model\n"
    )
    with pytest.raises(Exception, match="gemma4_unified: the built-in template has no tool calls"):
        render(tokenizer, "gemma4_unified", WITH_TOOLS, TOOLS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalog_templates_train_the_answers_and_their_end_of_turn(tiny_model_dir, name):
    """With the family's markers as special tokens, each answer and the marker after it are trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    marker = BUILTIN_END_OF_TURN[name] or tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": [marker]})
    config = Config.model_validate({"base_model": "/m", "lora_target_linear": True, "max_steps": 1,
                                    "chat_template_kwargs": KWARGS, "datasets": [
        {"path": "/d.jsonl", "type": "chat_template", "chat_template": name}]})
    fmt = build_format(config, 0, tokenizer)
    assert not fmt.warnings
    messages = CONVERSATION[1:] if name in NO_SYSTEM else CONVERSATION
    [row] = list(encode_rows([(0, 0, {"messages": messages})], [fmt], tokenizer, train_on_inputs=False))
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    # metharme writes its end (EOS) once, after the last turn
    assert tokenizer.decode(trained) == (f"34{marker}" if name == "metharme" else f"3{marker}4{marker}")
    assert tokenizer.decode(row["input_ids"]) == EXPECTED[name]


def test_catalog_names_are_config_values_and_gemma3_is_no_longer_a_typo():
    from axlora.config.base import known_chat_template

    for name in CATALOG:
        assert known_chat_template(name) == name
    with pytest.raises(ValueError, match="did you mean 'qwen3'"):
        known_chat_template("qwen4")


@pytest.mark.parametrize(("name", "call", "marker"), [
    ("qwen_25", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<|im_end|>"),
    ("qwen3", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<|im_end|>"),
    ("llama4", '<|python_start|><|python_end|>{"name": "weather", "parameters": {"city": "Paris"}}', "<|eot|>"),
])
def test_tool_calls_are_trained_with_the_answer(tiny_model_dir, name, call, marker):
    """Data as OpenAI-style files hold it: arguments as JSON text, tools in their own column."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [marker]})
    messages = [dict(m) for m in WITH_TOOLS]
    messages[2]["tool_calls"] = [{"type": "function", "function": {"name": "weather",
                                                                   "arguments": '{"city": "Paris"}'}}]
    config = Config.model_validate({"base_model": "/m", "lora_target_linear": True, "max_steps": 1, "datasets": [
        {"path": "/d.jsonl", "type": "chat_template", "chat_template": name}]})
    fmt = build_format(config, 0, tokenizer)
    [row] = list(encode_rows([(0, 0, {"messages": messages, "tools": json.dumps(TOOLS)})], [fmt], tokenizer,
                             train_on_inputs=False))
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f"{call}{marker}Sunny, 22C.{marker}"
