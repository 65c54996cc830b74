"""``axlora inference``: answer prompts (arguments, a file, standard input) or chat, in the run's own format.

Everything that can be wrong with the input (flags, prompts file, adapter or merged directory, its base model)
is refused before the model loads. Status lines go to standard error, answers to standard output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from axlora.config.schema import Config
from axlora.core.atomic import atomic_write_text
from axlora.core.errors import UserError
from axlora.inference.engine import Conversation, Engine
from axlora.inference.loading import choose_source, load_model, load_tokenizer_for
from axlora.inference.options import InferenceOptions
from axlora.inference.prompts import (
    PromptRequest,
    file_requests,
    prompt_format,
    stdin_requests,
    text_requests,
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_inference(config: Config, options: InferenceOptions, stdin: TextIO | None = None,
                  log: Callable[[str], None] = _stderr) -> None:
    """Load the run's model once, then answer every prompt (or chat until the user ends it)."""
    stdin = stdin if stdin is not None else sys.stdin
    options.check()
    _check_output(options.output)
    requests = _requests(options, stdin)  # a bad prompts file fails before the model loads
    if options.gradio:
        from axlora.inference.web import require_gradio

        require_gradio()
    engine = _load_engine(config, options, log)
    if options.gradio:
        from axlora.inference.web import serve

        serve(engine, f"axlora: {Path(config.output_dir).name}")
    elif requests is None:
        from axlora.inference.chat import run_chat

        run_chat(Conversation(engine))
    else:
        answers = engine.answer(requests)
        _write_answers(requests, answers, options.output, log)


def _check_output(output: str | None) -> None:
    if output is None or output == "-":
        return
    path = Path(output).expanduser()
    if path.is_dir():
        raise UserError(f"--output: {output} is a directory; give the path of a .jsonl file to write.")
    if not path.parent.is_dir():
        raise UserError(f"--output: the directory of {output} does not exist.")


def _requests(options: InferenceOptions, stdin: TextIO) -> list[PromptRequest] | None:
    """The prompts to answer; None for an interactive chat (a terminal and no prompts given)."""
    if options.prompts:
        return text_requests(options.prompts, "--prompt")
    if options.prompts_file is not None:
        return file_requests(options.prompts_file)
    if options.gradio:
        return None
    if stdin.isatty():
        if options.output:
            raise UserError("inference: --output needs prompts: give --prompt, --prompts FILE, or pipe them in.")
        return None
    return stdin_requests(stdin)


def _load_engine(config: Config, options: InferenceOptions, log: Callable[[str], None]) -> Engine:
    from axlora.train.precision import choose_precision

    source = choose_source(config, options.lora_model_dir, options.merged)
    log(f"inference: loading {source.reason}")
    tokenizer = load_tokenizer_for(config, source)
    fmt = prompt_format(config, tokenizer, options.system)  # a bad template fails before the weights load
    precision = choose_precision(config)
    model = load_model(config, source, tokenizer, precision.torch_dtype, log)
    _seed(options.seed if options.seed is not None else config.seed)
    sampling = options.sampling
    how = "greedy" if sampling.temperature == 0 else f"sampling at temperature {sampling.temperature:g}"
    log(f"inference: {fmt.dataset_type} prompts, {how}, up to {sampling.max_new_tokens} new tokens, "
        f"{precision.name} on {next(model.parameters()).device}")
    return Engine(model, tokenizer, fmt, sampling, options.batch_size)


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _write_answers(requests: list[PromptRequest], answers: list[str], output: str | None,
                   log: Callable[[str], None]) -> None:
    """Plain answers on standard output; with ``--output``, one JSON line per prompt (its row and response)."""
    if output is None:
        for answer in answers:
            print(answer, flush=True)
        return
    lines = "".join(json.dumps({**request.row, "response": answer}, ensure_ascii=False) + "\n"
                    for request, answer in zip(requests, answers, strict=True))
    if output == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        atomic_write_text(Path(output).expanduser(), lines)
        log(f"inference: wrote {len(answers)} answers to {output}")
