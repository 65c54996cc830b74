"""Chat templates of model families under Axolotl's built-in names, written for axlora.

Each renders its family's published chat format (the same text as the model's own template for system,
user, assistant and tool messages, tool definitions and tool calls where the family has them), so a
dataset can name the format (``chat_template: qwen_25``) for a base model whose tokenizer has none.
Plain strings: ``chat_templates`` joins them to the other names; ``tests/test_chat_templates.py`` holds
the expected rendering of each on a multi-turn conversation.
"""

from __future__ import annotations

_QWEN_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)
_QWEN_TOOL_RESPONSE = (
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
)


def _qwen_tools_block(system_part: str) -> str:
    return (
        "{%- if tools %}{{- '<|im_start|>system\n' }}" + system_part
        + "{{- '" + _QWEN_TOOLS_HEADER.replace("\n", "\\n") + "' }}"
        "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
        "{{- '" + _QWEN_TOOLS_FOOTER.replace("\n", "\\n") + "' }}"
    )


QWEN_25 = (
    "{%- set system = messages[0].content if messages[0].role == 'system' else "
    "'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}"
    + _qwen_tools_block("{{- system }}{{- '\n\n' }}")
    + "{%- else %}{{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    + _QWEN_TOOL_RESPONSE
    + "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{{- '<|im_start|>assistant' }}{%- if m.content %}{{- '\n' + m.content }}{%- endif %}"
    "{%- for call in m.tool_calls %}{%- set f = call.function if call.function is defined else call %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif m.role in ('user', 'system', 'assistant') %}"
    "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_REASONING_FROM_CONTENT = (
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
)
_ANSWER_FROM_CONTENT = "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"


def _qwen3(inline_thinking: str) -> str:
    """Qwen3's format; ``inline_thinking`` reads reasoning written inline (<think>...</think>) in an answer."""
    return (
        _qwen_tools_block("{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}")
        + "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- set ns = namespace(last_query=messages | length - 1, searching=true) %}"
        "{%- for m in messages[::-1] %}"
        "{%- if ns.searching and m.role == 'user' and not (m.content.startswith('<tool_response>') and "
        "m.content.endswith('</tool_response>')) %}"
        "{%- set ns.searching = false %}{%- set ns.last_query = messages | length - 1 - loop.index0 %}"
        "{%- endif %}{%- endfor %}"
        "{%- set last = real_last_index if real_last_index is defined and real_last_index is not none "
        "else messages | length - 1 %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
        "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
        "{%- elif m.role == 'assistant' %}"
        "{%- set content = m.content %}{%- set reasoning = '' %}"
        "{%- if m.reasoning_content is defined and m.reasoning_content is not none %}"
        "{%- set reasoning = m.reasoning_content %}"
        "{%- elif '</think>' in content %}" + inline_thinking + "{%- endif %}"
        "{%- if loop.index0 > ns.last_query and (loop.index0 == last or reasoning) %}"
        "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
        "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
        "{%- for call in m.tool_calls or [] %}"
        "{%- if content or not loop.first %}{{- '\n' }}{%- endif %}"
        "{%- set f = call.function if call.function else call %}"
        "{{- '<tool_call>\n{\"name\": \"' + f.name + '\", \"arguments\": ' + "
        "(f.arguments if f.arguments is string else f.arguments | tojson) + '}\n</tool_call>' }}"
        "{%- endfor %}{{- '<|im_end|>\n' }}"
        + _QWEN_TOOL_RESPONSE
        + "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
        "{{- '<think>\n\n</think>\n\n' if enable_thinking is defined and enable_thinking is false else '<think>\n\n' }}"
        "{%- endif %}"
    )


QWEN3 = _qwen3(_REASONING_FROM_CONTENT + _ANSWER_FROM_CONTENT)
QWEN3_5 = _qwen3(_ANSWER_FROM_CONTENT + _REASONING_FROM_CONTENT)
"""Qwen3.5's text format is Qwen3's, except that reasoning written inline in an answer is read after the
answer was cut from it (so it repeats the answer), as Qwen3.5's published template does."""

_ALTERNATE = (
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
)


def _mistral(user: str, assistant: str) -> str:
    """Mistral's [INST] formats: user and assistant turns only, alternating (system and tool roles refused)."""
    return (
        "{{- bos_token }}{%- for m in messages %}" + _ALTERNATE
        + "{%- if m.role == 'user' %}{{- " + user + " }}"
        "{%- elif m.role == 'assistant' %}{{- " + assistant + " + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
        "{%- endfor %}"
    )


MISTRAL_V1 = _mistral("' [INST] ' + m.content + ' [/INST]'", "' ' + m.content")
MISTRAL_V2V3 = _mistral("'[INST] ' + m.content + '[/INST]'", "' ' + m.content")
MISTRAL_V3_TEKKEN = _mistral("'[INST]' + m.content + '[/INST]'", "m.content")

MISTRAL_V7_TEKKEN = (
    "{%- set default_system = 'You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French "
    "startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is ' + "
    "strftime_now('%Y-%m-%d') + '.\n\nWhen you\\'re not sure about some information, you say that you don\\'t have "
    "the information and don\\'t make up anything.\nIf the user\\'s question is not clear, ambiguous, or does not "
    "provide enough context for you to accurately answer the question, you do not try to answer it right away and "
    "you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => "
    "\"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")' %}"
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = default_system %}{%- set turns = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}"
    "{%- for m in turns %}"
    "{%- if m.role == 'user' %}{{- '[INST]' + m.content + '[/INST]' }}"
    "{%- elif m.role == 'system' %}{{- '[SYSTEM_PROMPT]' + m.content + '[/SYSTEM_PROMPT]' }}"
    "{%- elif m.role == 'assistant' %}{{- m.content + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

GEMMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content + '\n\n' %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}" + _ALTERNATE
    + "{{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (prefix if loop.first else '') "
    "+ (m.content | trim) + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

GEMMA4 = (
    "{{- bos_token }}"
    "{%- set thinking = enable_thinking is defined and enable_thinking %}"
    "{%- if thinking or messages[0].role == 'system' %}{{- '<|turn>system\n' + ('<|think|>' if thinking else '') }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content | trim }}{%- endif %}{{- '<turn|>\n' }}{%- endif %}"
    "{%- set turns = messages[1:] if messages[0].role == 'system' else messages %}"
    "{%- for m in turns %}"
    "{{- '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (m.content | trim) + '<turn|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|turn>model\n' }}"
    "{%- if not thinking %}{{- '<|channel>thought\n<channel|>' }}{%- endif %}{%- endif %}"
)

_GEMMA4_VISIBLE = (  # a model message without its thinking channels (<|channel>...<channel|>), as Gemma 4 trains it
    "{%- macro visible(text, model) %}{%- if model %}{%- set shown = namespace(text='') %}"
    "{%- for part in text.split('<channel|>') %}{%- set shown.text = shown.text + part.split('<|channel>')[0] %}"
    "{%- endfor %}{{- shown.text | trim }}{%- else %}{{- text | trim }}{%- endif %}{%- endmacro %}"
)

GEMMA4_UNIFIED = (  # Gemma 4 12B's format: consecutive assistant messages share one model turn
    _GEMMA4_VISIBLE + "{{- bos_token }}"
    "{%- set thinking = enable_thinking is defined and enable_thinking %}"
    "{%- set has_system = messages[0].role in ['system', 'developer'] %}"
    "{%- if thinking or has_system %}{{- '<|turn>system\n' + ('<|think|>\n' if thinking else '') }}"
    "{%- if has_system and messages[0].content is string %}{{- messages[0].content | trim }}"
    "{%- elif has_system %}{%- for part in messages[0].content %}{{- part.text | trim + ' ' }}{%- endfor %}{%- endif %}"
    "{{- '<turn|>\n' }}{%- endif %}"
    "{%- for m in (messages[1:] if has_system else messages) %}"
    "{%- if m.role == 'tool' or m.tool_calls %}{{- raise_exception('gemma4_unified: the built-in template "
    "has no tool calls; use chat_template: tokenizer_default') }}{%- endif %}"
    "{%- set model = m.role == 'assistant' %}"
    "{%- if not (model and loop.previtem is defined and loop.previtem.role == 'assistant') %}"
    "{{- '<|turn>' + ('model' if model else m.role) + '\n' }}{%- endif %}"
    "{%- if m.content is string %}{{- visible(m.content, model) }}"
    "{%- else %}{%- for part in m.content %}{%- if part.type == 'text' %}{{- visible(part.text, model) }}"
    "{%- elif part.type in ['image', 'audio', 'video'] %}{{- '<|' + part.type + '|>' }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<turn|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|turn>model\n' }}"
    "{%- if not thinking %}{{- '<|channel>thought\n<channel|>' }}{%- endif %}{%- endif %}"
)

COHERE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0].content + '<|END_OF_TURN_TOKEN|>' }}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{%- for m in turns %}" + _ALTERNATE
    + "{%- if m.role == 'user' %}{{- '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + m.content.strip() + "
    "'<|END_OF_TURN_TOKEN|>' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + m.content.strip() + "
    "'<|END_OF_TURN_TOKEN|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif %}"
)

DEEPSEEK_V2 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{- '<｜Assistant｜>' + m.content + eos_token }}"
    "{%- elif m.role == 'system' %}{{- m.content + '\n\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)

_DEEPSEEK_CALL = (
    "'<｜tool▁call▁begin｜>' + call.type + '<｜tool▁sep｜>' + call.function.name + '\n```json\n' + "
    "call.function.arguments + '\n```<｜tool▁call▁end｜>'"
)

DEEPSEEK_V3 = (
    "{%- set ns = namespace(system='', tool=false, first_output=true, called=false) %}"
    "{%- for m in messages if m.role == 'system' %}"
    "{%- set ns.system = ns.system + ('\n\n' if not loop.first else '') + m.content %}{%- endfor %}"
    "{{- bos_token + ns.system }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- set ns.tool = false %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' and 'tool_calls' in m %}{%- set ns.tool = false %}"
    "{%- for call in m.tool_calls %}"
    "{%- if ns.called %}{{- '\n' }}{%- else %}{{- '<｜Assistant｜>' + (m.content or '') + '<｜tool▁calls▁begin｜>' }}"
    "{%- endif %}{%- set ns.called = true %}{{- " + _DEEPSEEK_CALL + " }}{%- endfor %}"
    "{{- '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if ns.tool %}{{- '<｜tool▁outputs▁end｜>' + m.content + '<｜end▁of▁sentence｜>' }}{%- set ns.tool = false %}"
    "{%- else %}{{- '<｜Assistant｜>' + m.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- elif m.role == 'tool' %}{%- set ns.tool = true %}"
    "{{- ('<｜tool▁outputs▁begin｜>' if ns.first_output else '') + '<｜tool▁output▁begin｜>' + m.content + "
    "'<｜tool▁output▁end｜>' }}{%- set ns.first_output = false %}"
    "{%- endif %}{%- endfor %}"
    "{%- if ns.tool %}{{- '<｜tool▁outputs▁end｜>' }}{%- endif %}"
    "{%- if add_generation_prompt and not ns.tool %}{{- '<｜Assistant｜>' }}{%- endif %}"
)

LLAMA4 = (
    "{{- bos_token }}"
    "{%- set tools = custom_tools if custom_tools is defined else (tools if tools is defined else none) %}"
    "{%- set in_user = tools_in_user_message if tools_in_user_message is defined else true %}"
    "{%- set tool_list = namespace(text='') %}"
    "{%- for t in tools or [] %}{%- set tool_list.text = tool_list.text + (t | tojson(indent=4)) + '\n\n' %}"
    "{%- endfor %}"
    "{%- set call_format = 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}.Do not use variables.\n\n' %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|header_start|>system<|header_end|>\n\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}"
    "{%- if tools is not none and not in_user %}{{- 'You have access to the following functions. To call a "
    "function, please respond with JSON for a function call.' + call_format + tool_list.text }}{%- endif %}"
    "{{- (messages[0].content | trim) + '<|eot|>' }}{%- set messages = messages[1:] %}{%- endif %}"
    "{%- if in_user and tools is not none %}"
    "{%- if messages | length == 0 %}{{- raise_exception('Cannot put tools in the first user message when "
    "there\\'s no first user message!') }}{%- endif %}"
    "{{- '<|header_start|>user<|header_end|>\n\nGiven the following functions, please respond with a JSON for a "
    "function call with its proper arguments that best answers the given prompt.\n\n' + call_format + "
    "tool_list.text + (messages[0].content | trim) + '<|eot|>' }}{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role in ('tool', 'ipython') %}"
    "{{- '<|header_start|>ipython<|header_end|>\n\n' + (m.content | tojson) + '<|eot|>' }}"
    "{%- elif 'tool_calls' in m and m.tool_calls | length > 0 %}"
    "{{- '<|header_start|>assistant<|header_end|>\n\n<|python_start|>' + m.content + '<|python_end|>' }}"
    "{%- for call in m.tool_calls %}"
    "{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' + (call.function.arguments | tojson) + '}' }}"
    "{%- endfor %}{{- '<|eot|>' }}"
    "{%- elif 'tool_calls' not in m %}"
    "{{- '<|header_start|>' + m.role + '<|header_end|>\n\n' + m.content + '<|eot|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\n\n' }}{%- endif %}"
)

PHI_35 = (
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and m.content %}{{- '<|system|>\n' + m.content + '<|end|>\n' }}"
    "{%- elif m.role in ('user', 'assistant') %}{{- '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)

PHI_4 = (
    "{%- set default_system = 'You are Phi, a language model trained by Microsoft to help users. Your role as an "
    "assistant involves thoroughly exploring questions through a systematic thinking process before providing the "
    "final precise and accurate solutions. This requires engaging in a comprehensive cycle of analysis, "
    "summarizing, exploration, reassessment, reflection, backtracing, and iteration to develop well-considered "
    "thinking process. Please structure your response into two main sections: Thought and Solution using the "
    "specified format: <think> {Thought section} </think> {Solution section}. In the Thought section, detail your "
    "reasoning process in steps. Each step should include detailed considerations such as analysing questions, "
    "summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the current steps, refining "
    "any errors, and revisiting previous steps. In the Solution section, based on various attempts, explorations, "
    "and reflections from the Thought section, systematically present the final solution that you deem correct. "
    "The Solution section should be logical, accurate, and concise and detail necessary steps needed to reach the "
    "conclusion. Now, try to solve the following question through the above guidelines:' %}"
    "{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = default_system %}{%- endif %}"
    "{{- '<|im_start|>system<|im_sep|>' + system + '<|im_end|>' }}"
    "{%- for m in messages if m.role in ('user', 'assistant') %}"
    "{{- '<|im_start|>' + m.role + '<|im_sep|>' + m.content + '<|im_end|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)

LLAMA3_2_VISION = (
    "{{- bos_token }}"
    "{%- set tools = custom_tools if custom_tools is defined else (tools if tools is defined else none) %}"
    "{%- set in_user = tools_in_user_message if tools_in_user_message is defined else true %}"
    "{%- set date = date_string if date_string is defined else (strftime_now('%d %b %Y') if strftime_now is defined "
    "else '26 Jul 2024') %}"
    "{%- set tool_list = namespace(text='') %}"
    "{%- for t in tools or [] %}{%- set tool_list.text = tool_list.text + (t | tojson(indent=4)) + '\n\n' %}"
    "{%- endfor %}"
    "{%- set call_format = 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}.Do not use variables.\n\n' %}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date + '\n\n' }}"
    "{%- if tools is not none and not in_user %}{{- 'You have access to the following functions. To call a "
    "function, please respond with JSON for a function call.' + call_format + tool_list.text }}{%- endif %}"
    "{{- system + '<|eot_id|>' }}"
    "{%- if in_user and tools is not none %}"
    "{%- if messages | length == 0 %}{{- raise_exception('Cannot put tools in the first user message when "
    "there\\'s no first user message!') }}{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
    "for a function call with its proper arguments that best answers the given prompt.\n\n' + call_format + "
    "tool_list.text + (messages[0].content | trim) + '<|eot_id|>' }}{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + (m.content | tojson) + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in m %}"
    "{%- if m.tool_calls | length != 1 %}{{- raise_exception('This model only supports single tool-calls at "
    "once!') }}{%- endif %}"
    "{%- set f = m.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"' + f.name + '\", \"parameters\": ' + "
    "(f.arguments | tojson) + '}<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

ALPACA = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}{{- m.content }}"
    "{%- elif m.role == 'user' %}{{- '### Instruction:\n' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{- '### Response:\n' + m.content + eos_token }}{%- endif %}"
    "{%- if not loop.last %}{{- '\n\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\n\n### Response:\n' }}{%- endif %}"
)

METHARME = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = 'Enter RP mode. You shall reply to the user while staying in character. Your "
    "responses must be detailed, creative, immersive, and drive the scenario forward.' %}{%- set turns = messages %}"
    "{%- endif %}{{- '<|system|>' + system }}"
    "{%- for m in turns %}"
    "{%- if m.role == 'user' %}{{- '<|user|>' + m.content.strip() }}"
    "{%- elif m.role == 'assistant' %}{{- '<|model|>' + m.content.strip() }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|model|>' if add_generation_prompt else eos_token }}"
)

EXAONE = (
    "{%- for m in messages %}"
    "{%- if loop.first and m.role != 'system' %}{{- '[|system|][|endofturn|]\n' }}{%- endif %}"
    "{{- '[|' + m.role + '|]' + m.content + ('\n' if m.role == 'user' else '[|endofturn|]\n') }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
)

FALCON_H1 = (
    "{{- bos_token }}"
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- 'You are a function calling AI model. You are provided with function signature within <tools> </tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don\\'t make assumptions about what "
    "values to plug into functions.\n<tools>\n' }}"
    "{%- for tool in tools %}{{- '[' + (tool | tojson) + ']' }}{%- endfor %}"
    "{{- '\n</tools>\nFor each function call, return a json object with function name and arguments within "
    "<tool_call> </tool_call> tags with the following schema:\n<tool_call>\n{\\'arguments\\': <args-dict>, "
    "\\'name\\': <function-name>}\n</tool_call>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages if m.role != 'system' %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

JAMBA = (
    "{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|startoftext|><|bom|><|system|> ' + system }}"
    "{%- if tools %}{{- ('\n\n' if system else '') + '<tool_definitions>\n# Tools\n\n## Functions' }}"
    "{%- for tool in tools %}"
    "{%- if tool.type is defined and tool.type is not none and tool.type != 'function' %}"
    "{{- raise_exception('Currently, the only supported tool type is `function`') }}{%- endif %}"
    "{{- '\n\n' + ((tool.function if tool.type is defined and tool.type is not none else tool) | tojson(indent=2)) }}"
    "{%- endfor %}{{- '\n</tool_definitions>' }}{%- endif %}"
    "{%- for m in turns %}"
    "{{- '<|eom|><|bom|><|' + m.role + '|> ' + ('(' + m.name + ')' if m.name is defined and m.name is not none "
    "else '') + ((m.content or '') if (m.content or '') is string else m.content | tojson) }}"
    "{%- if m.role == 'assistant' and m.tool_calls %}{{- '<tool_calls>[\n' }}"
    "{%- for call in m.tool_calls %}{%- set f = call.function if call.function is defined and call.function is not "
    "none else call %}"
    "{{- '    {\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments if f.arguments is string else "
    "f.arguments | tojson) + '}' + (',\n' if not loop.last else '') }}"
    "{%- endfor %}{{- '\n]</tool_calls>' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|eom|><|bom|><|assistant|>' if add_generation_prompt else '<|eom|>' }}"
)

CATALOG: dict[str, tuple[str, str | None]] = {
    "qwen_25": (QWEN_25, "<|im_end|>"),
    "qwen3": (QWEN3, "<|im_end|>"),
    "qwen3_5": (QWEN3_5, "<|im_end|>"),
    "mistral_v1": (MISTRAL_V1, None),
    "mistral_v2v3": (MISTRAL_V2V3, None),
    "mistral_v3_tekken": (MISTRAL_V3_TEKKEN, None),
    "mistral_v7_tekken": (MISTRAL_V7_TEKKEN, None),
    "gemma3": (GEMMA3, "<end_of_turn>"),
    "gemma3n": (GEMMA3, "<end_of_turn>"),
    "gemma4": (GEMMA4, "<turn|>"),
    "gemma4_unified": (GEMMA4_UNIFIED, "<turn|>"),
    "cohere": (COHERE, "<|END_OF_TURN_TOKEN|>"),
    "deepseek_v2": (DEEPSEEK_V2, None),
    "deepseek_v3": (DEEPSEEK_V3, "<｜end▁of▁sentence｜>"),
    "llama4": (LLAMA4, "<|eot|>"),
    "phi_35": (PHI_35, "<|end|>"),
    "phi_4": (PHI_4, "<|im_end|>"),
    "llama3_2_vision": (LLAMA3_2_VISION, "<|eot_id|>"),
    "alpaca": (ALPACA, None),
    "metharme": (METHARME, None),
    "exaone": (EXAONE, "[|endofturn|]"),
    "falcon_h1": (FALCON_H1, "<|im_end|>"),
    "jamba": (JAMBA, "<|eom|>"),
}
"""Name -> (Jinja text, end-of-turn marker; None: the tokenizer's EOS token, which the template writes)."""
