"""A generated preference set for the demo and the tests: addition questions with the right sum chosen and a
near miss rejected, in Axolotl's ``chat_template.default`` shape. Seeded, so every run sees the same rows."""

from __future__ import annotations

import random

from axlora.data.demo_rows import ADD_INSTRUCTION


def addition_pairs(count: int, seed: int = 0, numbers: tuple[int, int] = (0, 49)) -> list[dict]:
    """Rows with ``messages`` (the question on two numbers in the ``numbers`` range), ``chosen`` (the sum) and
    ``rejected`` (the sum off by 1 to 9)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(*numbers), rng.randint(*numbers)
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 9)
        rows.append({
            "messages": [{"role": "user", "content": f"{ADD_INSTRUCTION}\n{a}+{b}"}],
            "chosen": {"role": "assistant", "content": str(a + b)},
            "rejected": {"role": "assistant", "content": str(abs(wrong))},
        })
    return rows


def addition_judgements(count: int, seed: int = 0) -> list[dict]:
    """KTO rows (``llama3.ultra`` / ``chatml.ultra`` shape): a prompt, one completion and whether it is right."""
    rows = []
    for index, pair in enumerate(addition_pairs(count, seed)):
        desirable = index % 2 == 0
        answer = pair["chosen" if desirable else "rejected"]["content"]
        rows.append({"prompt": pair["messages"][0]["content"], "completion": answer, "label": desirable})
    return rows


def alpaca_addition_pairs(count: int, seed: int = 0, numbers: tuple[int, int] = (0, 49)) -> list[dict]:
    """``user_defined.default`` rows whose prompt is the alpaca prompt of the supervised demo (``demo_rows``), so
    a DPO round continues the demo's SFT adapter on the format it learned. The demo's round asks for numbers
    25 to 59, about half of them above the supervised round's range: there that adapter gives the right sum only
    part of its likelihood, so the preference round can raise it as well as lower the near misses."""
    from axlora.data.formats import alpaca_prompt

    return [{"prompt": alpaca_prompt(ADD_INSTRUCTION, pair["messages"][0]["content"].split("\n")[1]),
             "chosen": pair["chosen"]["content"], "rejected": pair["rejected"]["content"]}
            for pair in addition_pairs(count, seed, numbers)]
