"""The step order held as numpy arrays gives exactly the rows the order over Python lists gave.

Bitwise resume and N processes == 1 process rely on the order being a pure function of (seed, step); these tests
pin it to the first implementation (kept below as a small reference), for every kind of order.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from axlora.config.schema import Config
from axlora.train.data_order import DataOrder, StreamOrder, shuffled_rows
from axlora.train.length_groups import MEGA_BATCH_STEPS, LengthGroupedOrder, SequentialOrder, build_data_order


def reference_epoch(num_rows: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_rows))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def reference_grouped(order: list[int], lengths: list[int], rows_per_step: int) -> list[int]:
    size = rows_per_step * MEGA_BATCH_STEPS
    return [row for start in range(0, len(order), size)
            for row in sorted(order[start:start + size], key=lambda row: -lengths[row])]


def reference_micro_batches(epoch_order, schedule: DataOrder, step: int, rank: int) -> list[list[int]]:
    """What ``DataOrder`` returned when an epoch's order was a tuple of ints."""
    per_step = schedule.rows_per_step
    whole = math.floor if schedule.drop_last else math.ceil
    steps_per_epoch = max(1, whole(schedule.num_rows / per_step))
    epoch, index = divmod(step, steps_per_epoch)
    mine = epoch_order(epoch)[index * per_step:(index + 1) * per_step][rank::schedule.world_size]
    return [mine[i:i + schedule.micro_batch_size] for i in range(0, len(mine), schedule.micro_batch_size)]


def random_shapes(count: int):
    rng = random.Random(7)
    for _ in range(count):
        yield dict(num_rows=rng.choice([1, 2, 3, 7, 100, 999, 5000]), micro_batch_size=rng.randint(1, 4),
                   gradient_accumulation_steps=rng.randint(1, 3), world_size=rng.choice([1, 2, 3]),
                   seed=rng.randint(0, 10**6), drop_last=rng.random() < 0.5)


def assert_same_steps(schedule: DataOrder, epoch_order) -> None:
    for step in range(3 * schedule.steps_per_epoch + 1):  # three epochs and the first step of a fourth
        for rank in range(schedule.world_size):
            got = schedule.micro_batches(step, rank)
            assert got == reference_micro_batches(epoch_order, schedule, step, rank), (schedule, step, rank)
            assert all(type(row) is int for batch in got for row in batch)


def test_the_shuffle_is_the_list_shuffle() -> None:
    for num_rows in [0, 1, 2, 3, 10, 4097]:
        for seed, epoch in [(0, 0), (42, 3)]:
            order = shuffled_rows(num_rows, f"{seed}-{epoch}")
            assert order.dtype == np.int32 and order.tolist() == reference_epoch(num_rows, seed, epoch)


@pytest.mark.parametrize("shape", list(random_shapes(12)))
def test_shuffled_steps_are_the_steps_of_the_tuple_order(shape) -> None:
    schedule = DataOrder(**shape)
    assert_same_steps(schedule, lambda epoch: reference_epoch(shape["num_rows"], shape["seed"], epoch))
    order = schedule._order(0)
    assert order.dtype == np.int32 and not order.flags.writeable  # 4 bytes a row, shared by the cache


@pytest.mark.parametrize("shape", list(random_shapes(8)))
def test_length_grouped_steps_are_the_steps_of_the_tuple_order(shape) -> None:
    rng = random.Random(shape["seed"])
    lengths = [rng.randint(1, 40) for _ in range(shape["num_rows"])]  # many ties: the shuffle must break them
    schedule = LengthGroupedOrder(**shape, lengths=np.asarray(lengths, dtype=np.int32).tobytes())
    per_step = schedule.rows_per_step
    assert_same_steps(schedule, lambda epoch: reference_grouped(
        reference_epoch(shape["num_rows"], shape["seed"], epoch), lengths, per_step))


@pytest.mark.parametrize("shape", list(random_shapes(4)))
def test_sequential_steps_are_the_rows_in_prepared_order(shape) -> None:
    schedule = SequentialOrder(**shape)
    assert_same_steps(schedule, lambda epoch: list(range(shape["num_rows"])))


def test_build_data_order_picks_each_order_from_the_config() -> None:
    def config(**keys):
        return Config.model_validate({"base_model": "/models/x", "lora_target_linear": True, "max_steps": 1,
                                      "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "seed": 3,
                                      "micro_batch_size": 2, **keys})

    rows = [{"input_ids": [0] * (1 + i % 9)} for i in range(300)]
    grouped = build_data_order(config(group_by_length=True), rows, world_size=2)
    lengths = [len(row["input_ids"]) for row in rows]
    assert isinstance(grouped, LengthGroupedOrder)
    assert_same_steps(grouped, lambda epoch: reference_grouped(reference_epoch(300, 3, epoch), lengths, 4))
    assert_same_steps(build_data_order(config(), rows, world_size=2), lambda epoch: reference_epoch(300, 3, epoch))


def test_a_stream_reads_its_rows_in_order() -> None:
    schedule = StreamOrder(num_rows=40, micro_batch_size=2, gradient_accumulation_steps=2, world_size=2, seed=0)
    assert schedule.step_rows(3) == list(range(24, 32))
    assert schedule.micro_batches(3, 1) == [[25, 27], [29, 31]]
