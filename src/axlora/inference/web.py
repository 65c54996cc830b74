"""``axlora inference --gradio``: the same conversation in a browser (gradio, an optional extra)."""

from __future__ import annotations

import importlib.util
import inspect

from axlora.core.errors import UserError
from axlora.inference.engine import Conversation, Engine


def require_gradio() -> None:
    """Checked before the model loads: the web chat needs the gradio package."""
    if importlib.util.find_spec("gradio") is None:
        raise UserError("inference: --gradio needs the gradio package, which is not installed: "
                        "pip install 'axlora[gradio]' (or pip install gradio).")


def serve(engine: Engine, title: str) -> None:
    """The chat page on gradio's local server (http://127.0.0.1:7860 unless GRADIO_SERVER_PORT says otherwise)."""
    chat_page(engine, title).launch()


def chat_page(engine: Engine, title: str):
    """A gradio chat page over ``engine``: the page holds the conversation, each answer streams in."""
    import gradio

    def respond(message: str, history: list[dict]):
        conversation = Conversation(engine)
        conversation.turns = [{"role": turn["role"], "content": _text(turn["content"])} for turn in history]
        answer = ""
        for piece in conversation.reply(message):
            answer += piece
            yield answer

    # gradio 5 hands history over as role/content messages only when asked; gradio 6 always does
    messages = {"type": "messages"} if "type" in inspect.signature(gradio.ChatInterface).parameters else {}
    return gradio.ChatInterface(respond, title=title, **messages)


def _text(content) -> str:
    """A message's text; gradio may hand content over as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)
