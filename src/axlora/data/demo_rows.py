"""The demo's generated task: alpaca rows asking for the sum of two numbers, and the neighbouring tasks the
built-in model is pre-trained on (see ``model.builtin``). Seeded, so every build and test sees the same rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

from axlora.core.atomic import atomic_write_text

ADD_INSTRUCTION = "Add the two numbers."
# The tasks the built-in model is pre-trained on: near addition, but not it (see the module docstring).
PRETRAIN_TASKS = (
    ("Repeat the first number.", lambda a, b: str(a)),
    ("Repeat the second number.", lambda a, b: str(b)),
    ("Add the last digits of the two numbers.", lambda a, b: str(a % 10 + b % 10)),
)
_PRETRAIN_ORDER = (0, 2, 1, 2)  # the digit sums take longest to learn: every other row


def addition_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows that ask for the sum of two numbers below 50: small enough to learn in a minute."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"instruction": ADD_INSTRUCTION, "input": f"{a}+{b}", "output": str(a + b)})
    return rows


def pretrain_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of ``PRETRAIN_TASKS`` on numbers below 100, one-digit ones often (30%)."""
    rng = random.Random(seed)

    def number() -> int:
        return rng.randint(0, 9) if rng.random() < 0.3 else rng.randint(10, 99)

    rows = []
    for index in range(count):
        instruction, answer = PRETRAIN_TASKS[_PRETRAIN_ORDER[index % len(_PRETRAIN_ORDER)]]
        a, b = number(), number()
        rows.append({"instruction": instruction, "input": f"{a}+{b}", "output": answer(a, b)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSON lines (atomically)."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
