"""The interactive chat on a terminal: answers stream as they are generated; ``/reset`` starts over, ``/exit``
(or end of input) ends it."""

from __future__ import annotations

from collections.abc import Callable

from axlora.inference.engine import Conversation

HELP = "type a message; /reset starts a new conversation, /exit (or Ctrl-D) ends"


def run_chat(conversation: Conversation, read: Callable[[str], str] = input,
             write: Callable[[str], None] | None = None) -> None:
    """Read a message, stream the answer, repeat until ``/exit`` or the end of input."""
    if write is None:
        write = _write_stdout
    note = "" if conversation.keeps_turns else " (this run's format has no turns: each message is answered alone)"
    write(f"{HELP}{note}\n")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("\n")
            return
        if text == "/exit":
            return
        if text == "/reset":
            conversation.reset()
            write("(new conversation)\n")
            continue
        if not text:
            continue
        write("model> ")
        for piece in conversation.reply(text):
            write(piece)
        write("\n")


def _write_stdout(text: str) -> None:
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()
