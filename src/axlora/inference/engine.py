"""The loaded model with the run's tokenizer and prompt format: answers prompts in batches, or streams one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from axlora.inference.prompts import Message, PromptFormat, PromptRequest, text_requests
from axlora.model.generate import Sampling, generate_texts, prompt_ids, stop_token_ids, stream_text


@dataclass
class Engine:
    """Everything a prompt needs on its way to an answer."""

    model: object
    tokenizer: object
    prompt_format: PromptFormat
    sampling: Sampling
    batch_size: int = 8
    stop_ids: list[int] = field(init=False)
    """EOS and the chat template's end-of-turn token: where an answer ends."""

    def __post_init__(self) -> None:
        self.stop_ids = stop_token_ids(self.tokenizer, self._format)

    @property
    def _format(self):
        """The format prompts are rendered with (a chat run's conversations, else the dataset's rows)."""
        return self.prompt_format.conversation_format or self.prompt_format.row_format

    def ids(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self._format)

    def answer(self, requests: Sequence[PromptRequest]) -> list[str]:
        """The answers to ``requests``, in order (left-padded batches of ``batch_size``)."""
        ids = [self.ids(self.prompt_format.render(request)) for request in requests]
        return generate_texts(self.model, self.tokenizer, ids, self.sampling, stop_ids=self.stop_ids,
                              batch_size=self.batch_size)

    def stream(self, text: str) -> Iterator[str]:
        """The answer to an already rendered prompt, piece by piece as it is generated."""
        return stream_text(self.model, self.tokenizer, self.ids(text), self.sampling, stop_ids=self.stop_ids)


class Conversation:
    """A chat that keeps its turns (chat runs); other formats have no turns, so each prompt stands alone."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.turns: list[Message] = []

    @property
    def keeps_turns(self) -> bool:
        return self.engine.prompt_format.is_chat

    def prompt_text(self, user_text: str) -> str:
        """What the model continues from when the user says ``user_text`` next."""
        fmt = self.engine.prompt_format
        if self.keeps_turns:
            return fmt.conversation([*self.turns, {"role": "user", "content": user_text}])
        return fmt.render(text_requests([user_text], "chat, prompt")[0])

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to ``user_text``; the finished exchange joins the conversation."""
        prompt = self.prompt_text(user_text)
        pieces = []
        for piece in self.engine.stream(prompt):
            pieces.append(piece)
            yield piece
        if self.keeps_turns:
            self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        self.turns = []
