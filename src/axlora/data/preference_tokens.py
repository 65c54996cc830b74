"""Preference examples as tokens: the prompt once, each answer after it, and ``sequence_len`` applied.

The prompt is rendered with the chat template and its generation prompt (``<|im_start|>assistant\\n``); an
answer is what the template writes after that prefix when the answer is added as the assistant's turn, so
its end-of-turn marker is part of what is trained. Chosen and rejected share the prompt's tokens exactly:
the loss compares the two answers, never two tokenizations of the prompt. ``user_defined.default`` has no
template: the prompt is its text and each answer ends with the EOS token. KTO rows hold one completion and
its label, and a mismatched completion for the KL estimate (``attach_mismatched_completions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axlora.core.errors import UserError
from axlora.data.preference_rows import Message, PreferenceExample
from axlora.data.segments import RowFormatError


@dataclass(frozen=True)
class PromptRenderer:
    """Renders a prompt and its answers to text with one chat template (None: plain text)."""

    tokenizer: Any
    template: str | None

    def prompt(self, messages: list[Message]) -> str:
        if self.template is None:
            return "\n\n".join(message["content"] for message in messages)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def answer(self, messages: list[Message], prompt_text: str, answer: str) -> str:
        if self.template is None:
            return answer + (self.tokenizer.eos_token or "")
        whole = self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}],
                                                   chat_template=self.template, tokenize=False)
        if not whole.startswith(prompt_text):
            raise RowFormatError("chosen", "the chat template does not render the answer after the prompt's "
                                 "generation prompt; choose another chat_template")
        return whole[len(prompt_text):]


@dataclass(frozen=True)
class LengthRule:
    """``sequence_len`` on prompt + answer: drop the example, truncate the answers, or raise."""

    sequence_len: int
    strategy: str  # drop | truncate | raise

    def apply(self, prompt: list[int], answers: list[list[int]], where: str) -> list[list[int]] | None:
        """The answers cut to fit after the prompt, or None when the example is dropped."""
        room = self.sequence_len - len(prompt)
        if all(len(answer) <= room for answer in answers):
            return answers
        if self.strategy == "raise":
            raise UserError(f"{where}: prompt + answer is {len(prompt) + max(map(len, answers))} tokens, over "
                            f"sequence_len {self.sequence_len} (excess_length_strategy: raise).")
        if self.strategy == "truncate" and room > 0:
            return [answer[:room] for answer in answers]
        return None


def tokenize_example(example: PreferenceExample, renderer: PromptRenderer, rule: LengthRule,
                     where: str) -> dict[str, Any] | None:
    """The example's token ids (prompt, then chosen and rejected; KTO: the completion and its label), or None
    when it does not fit ``sequence_len``."""
    tokenizer = renderer.tokenizer
    prompt_text = renderer.prompt(example.prompt)
    prompt = tokenizer(prompt_text, add_special_tokens=renderer.template is None).input_ids
    texts = [example.chosen] if example.rejected is None else [example.chosen, example.rejected]
    answers = [tokenizer(renderer.answer(example.prompt, prompt_text, text), add_special_tokens=False).input_ids
               for text in texts]
    if not all(answers):
        raise RowFormatError("chosen", "an answer renders to no tokens")
    answers = rule.apply(prompt, answers, where)
    if answers is None:
        return None
    row: dict[str, Any] = {"prompt_ids": prompt, "chosen_ids": answers[0], "input_ids": prompt + answers[0]}
    if example.rejected is None:
        row["label"] = example.desirable
    else:
        row["rejected_ids"] = answers[1]
    return row


def attach_mismatched_completions(rows: list[dict[str, Any]], sequence_len: int) -> None:
    """KTO's KL estimate z0 compares policy and reference on completions that do not answer their prompt (as
    TRL pairs a batch's prompts with its shifted completions): each row's prompt gets the next row's completion
    (the last row the first's), cut to fit ``sequence_len``, as ``kl_ids``. Fixed here, before training, so the
    reference's log-probs of these sequences can be computed once and a resumed run sees the same pairs."""
    for index, row in enumerate(rows):
        other = rows[(index + 1) % len(rows)]["chosen_ids"]
        row["kl_ids"] = other[: sequence_len - len(row["prompt_ids"])]
