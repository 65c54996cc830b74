"""``axlora inference``: answers equal plain transformers + peft greedy generation over the run's template, in
every prompt mode (arguments, a file, standard input) and from the merged model; chat runs render their
template with the system message and keep the conversation; bad input exits 2 naming what is wrong."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from axlora.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

from conftest import main_in_process, run_cli

NEW_TOKENS = 12
PROMPTS = [
    "Add the two numbers.",
    {"instruction": "Add the two numbers.", "input": "12+35"},
    "Repeat the first number of 41+8, please, and nothing else.",
]


def _alpaca_text(entry) -> str:
    """The alpaca template written out, independently of axlora's formats."""
    if isinstance(entry, str):
        return ALPACA_PROMPT_NO_INPUT.format(instruction=entry)
    return ALPACA_PROMPT_WITH_INPUT.format(**entry)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, alpaca_file) -> Path:
    """A run directory as training leaves it: config, final/ (a LoRA with non-zero weights + tokenizer), merged/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axlora.config.load import load_config
    from axlora.merge_command import run_merge

    root = tmp_path_factory.mktemp("inference")
    config = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
              "sequence_len": 96, "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "max_steps": 4,
              "output_dir": str(root / "out")}
    (root / "config.yml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    with torch.no_grad():  # a strong adapter, so answers with and without it differ
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.mul_(50)
    peft_model.save_pretrained(root / "out" / "final")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "out" / "final")
    run_merge(load_config(root / "config.yml", []), lora_model_dir=None, output=None, dtype=None, verify=True,
              log=lambda _message: None)
    return root


@pytest.fixture(scope="module")
def expected(run, tiny_model_dir) -> list[str]:
    """Plain transformers + peft: the adapter on the base, greedy ``generate`` one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "out" / "final")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "out" / "final")
    model.eval()
    answers = []
    for entry in PROMPTS:
        ids = tokenizer(_alpaca_text(entry), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert all(answers) and len(set(answers)) == len(answers), answers  # real text to compare, not empty answers
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer(_alpaca_text(PROMPTS[1]), return_tensors="pt").input_ids
    without = base.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(without[0, ids.shape[1]:], skip_special_tokens=True) != answers[1], "adapter too weak"
    return answers


def _prompt_args() -> list[str]:
    args = []
    for entry in PROMPTS:
        args += ["--prompt", entry if isinstance(entry, str) else json.dumps(entry)]
    return args


@pytest.mark.slow
def test_answers_equal_plain_peft_greedy_generate(run, expected):
    result = run_cli("inference", str(run / "config.yml"), *_prompt_args(), "--output", "-",
                     "--max-new-tokens", str(NEW_TOKENS))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [row["response"] for row in rows] == expected
    assert "the run's final adapter" in result.stderr


@pytest.mark.slow
def test_file_stdin_and_merged_answer_alike(run, expected, capsys, monkeypatch):
    prompts = run / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": entry, "id": i}) + "\n" for i, entry in enumerate(PROMPTS)))
    config, tokens = str(run / "config.yml"), ["--max-new-tokens", str(NEW_TOKENS), "--batch-size", "2"]

    result = main_in_process(capsys, "inference", config, "--prompts", str(prompts), "--output",
                             str(run / "answers.jsonl"), *tokens)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [0, 1, 2]  # the input row comes back with its response
    assert [row["response"] for row in rows] == expected

    # text prompts: one per line; a JSON object is the format's fields
    lines = "".join((e if isinstance(e, str) else json.dumps(e)) + "\n\n" for e in PROMPTS)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    result = main_in_process(capsys, "inference", config, "--output", "-", *tokens)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["response"] for line in result.stdout.splitlines()] == expected

    result = main_in_process(capsys, "inference", config, "--merged", "--prompts", str(prompts),
                             "--output", "-", *tokens)
    assert result.returncode == 0, result.stderr
    assert "the merged model" in result.stderr
    assert [json.loads(line)["response"] for line in result.stdout.splitlines()] == expected


class _Terminal(io.StringIO):
    """Typed lines, as a terminal would give them."""

    def isatty(self) -> bool:
        return True


@pytest.mark.slow
def test_terminal_chat_streams_the_same_answers(run, expected, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", _Terminal(f"{PROMPTS[0]}\n/reset\n{PROMPTS[2]}\n/exit\nnever read\n"))
    result = main_in_process(capsys, "inference", str(run / "config.yml"), "--max-new-tokens", str(NEW_TOKENS))
    assert result.returncode == 0, result.stderr
    assert f"you> model> {expected[0]}\nyou> (new conversation)\nyou> model> {expected[2]}\nyou> " in result.stdout
    assert "each message is answered alone" in result.stdout  # alpaca has no turns to keep


@pytest.mark.slow
def test_chat_run_renders_its_template_and_keeps_the_conversation(tmp_path, run, tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    from axlora.config.chat_templates import BUILTIN_TEMPLATES
    from axlora.config.load import load_config
    from axlora.inference.chat import run_chat
    from axlora.inference.engine import Conversation, Engine
    from axlora.inference.loading import choose_source, load_model, load_tokenizer_for
    from axlora.inference.prompts import PromptRequest, prompt_format
    from axlora.model.generate import Sampling

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}))
    data = yaml.safe_load((run / "config.yml").read_text())
    data.update(datasets=[{"path": str(chats), "type": "sharegpt"}], chat_template="chatml")
    (tmp_path / "chat.yml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "chat.yml", [])
    source = choose_source(config, None, merged=False)
    tokenizer = load_tokenizer_for(config, source)
    fmt = prompt_format(config, tokenizer, system="Answer briefly.")

    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "and 3+3?"}]
    plain = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, *turns], chat_template=BUILTIN_TEMPLATES["chatml"],
        tokenize=False, add_generation_prompt=True)
    assert fmt.render(PromptRequest({}, messages=turns)) == plain

    engine = Engine(load_model(config, source, tokenizer, torch.float32, print), tokenizer, fmt, Sampling(max_new_tokens=6))
    conversation = Conversation(engine)
    streamed = "".join(conversation.reply("2+2?"))
    assert streamed == engine.answer([PromptRequest({}, entry="2+2?")])[0]  # streaming answers what a batch does
    assert conversation.prompt_text("and 3+3?") == fmt.conversation(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": streamed},
         {"role": "user", "content": "and 3+3?"}])

    typed = iter(["/reset", "hello", "/exit", "never read"])
    shown: list[str] = []
    run_chat(conversation, read=lambda _prompt: next(typed), write=shown.append)
    assert [t["content"] for t in conversation.turns] == ["hello", "".join(shown[3:-1])]
    assert next(typed) == "never read"


# ---- bad input: exit 2, naming what is wrong, before any model loads -------------------------------------

def test_missing_adapter_or_merged_model_exits_2(tmp_path, run, capsys):
    data = yaml.safe_load((run / "config.yml").read_text())
    data["output_dir"] = str(tmp_path / "untrained")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(data))

    result = main_in_process(capsys, "inference", str(tmp_path / "c.yml"), "--prompt", "hi")
    assert result.returncode == 2 and "no adapter to load" in result.stderr
    assert str(tmp_path / "untrained" / "final") in result.stderr
    result = main_in_process(capsys, "inference", str(tmp_path / "c.yml"), "--merged", "--prompt", "hi")
    assert result.returncode == 2 and str(tmp_path / "untrained" / "merged") in result.stderr
    result = main_in_process(capsys, "inference", str(tmp_path / "c.yml"), "--lora_model_dir",
                             str(tmp_path / "nowhere"), "--prompt", "hi")
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_adapter_of_another_base_model_exits_2(tmp_path, run, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(run / "out" / "final", foreign)
    adapter_config = json.loads((foreign / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "someone/another-model"
    (foreign / "adapter_config.json").write_text(json.dumps(adapter_config))
    result = main_in_process(capsys, "inference", str(run / "config.yml"), "--lora_model_dir", str(foreign),
                             "--prompt", "hi")
    assert result.returncode == 2
    assert "someone/another-model" in result.stderr and "Traceback" not in result.stderr


def test_bad_prompts_exit_2_naming_file_and_line(tmp_path, run, capsys, monkeypatch):
    config = str(run / "config.yml")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = main_in_process(capsys, "inference", config, "--prompts", str(empty))
    assert result.returncode == 2 and f"{empty} holds no prompt" in result.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    result = main_in_process(capsys, "inference", config, "--prompts", str(bad))
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr

    result = main_in_process(capsys, "inference", config, "--prompts", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "missing.jsonl does not exist" in result.stderr

    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    result = main_in_process(capsys, "inference", config)
    assert result.returncode == 2 and "standard input holds no prompt" in result.stderr

    result = main_in_process(capsys, "inference", config, "--prompt", "hi", "--prompt", " ")
    assert result.returncode == 2 and "--prompt 2 is empty" in result.stderr
    result = main_in_process(capsys, "inference", config, "--prompt", "hi", "--top-p", "0.9")
    assert result.returncode == 2 and "--temperature" in result.stderr
    result = main_in_process(capsys, "inference", config, "--prompt", "hi", "--system", "be brief")
    assert result.returncode == 2 and "--system needs a chat run" in result.stderr


def test_gradio_missing_exits_2(run, capsys):
    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed here")
    result = main_in_process(capsys, "inference", str(run / "config.yml"), "--gradio")
    assert result.returncode == 2 and "pip install 'axlora[gradio]'" in result.stderr


@pytest.mark.slow
def test_gradio_page_answers_like_the_command_line(run, expected):
    pytest.importorskip("gradio")
    import torch

    from axlora.config.load import load_config
    from axlora.inference.engine import Engine
    from axlora.inference.loading import choose_source, load_model, load_tokenizer_for
    from axlora.inference.prompts import prompt_format
    from axlora.inference.web import chat_page
    from axlora.model.generate import Sampling

    config = load_config(run / "config.yml", [])
    source = choose_source(config, None, merged=False)
    tokenizer = load_tokenizer_for(config, source)
    engine = Engine(load_model(config, source, tokenizer, torch.float32, print), tokenizer,
                    prompt_format(config, tokenizer, None), Sampling(max_new_tokens=NEW_TOKENS))
    page = chat_page(engine, "test")
    *_, answer = page.fn(PROMPTS[0], [])  # the page's handler streams the answer as it grows
    assert answer == expected[0]
