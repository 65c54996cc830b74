"""The demo's shipped data is what its generator makes, and its answers are right."""

from __future__ import annotations

import json

from axlora.data.demo_rows import addition_rows, pretrain_rows

from conftest import REPO


def test_shipped_data_is_reproducible_and_correct():
    path = REPO / "examples" / "data" / "addition.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == addition_rows(len(rows), seed=0)
    for row in rows:
        a, b = (int(x) for x in row["input"].split("+"))
        assert row["output"] == str(a + b)


def test_pretraining_tasks_are_not_the_demo_task():
    instructions = {row["instruction"] for row in pretrain_rows(40)}
    assert "Add the two numbers." not in instructions and len(instructions) == 3
