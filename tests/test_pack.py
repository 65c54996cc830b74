"""Sample packing and collation: bin packing, boundary labels, and packed == unpacked for a real model.

The model tests use a tiny random Llama (no Hub access) and check the two properties packing must
keep: a sample's logits do not depend on its row neighbours, and the summed token loss over a
packed batch is the sum of the per-sample losses, so packing does not change what is optimised.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from axlora.core.names import IGNORE_INDEX
from axlora.data.collate import (
    PackedCollator,
    PaddedCollator,
    count_label_tokens,
    model_inputs,
    varlen_kwargs,
)
from axlora.data.pack import PackingStats, pack_examples, pack_offsets, pack_sequences

VOCAB = 128


def lognormal_lengths(n: int, seed: int = 0, median: float = 200, sigma: float = 0.6) -> list[int]:
    rng = random.Random(seed)
    return [min(2048, max(16, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def random_example(n: int, prompt: int, gen: torch.Generator) -> dict[str, list[int]]:
    """``n`` random tokens whose first ``prompt`` labels are masked, like a tokenized chat sample."""
    input_ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * prompt + input_ids[prompt:]}


def tiny_llama(attn_implementation: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    # train() on purpose: it is how the training loop runs (Llama has no dropout by default).
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


# --- bin packing -----------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [64, 300, 4096])
def test_every_sample_packed_once_and_no_row_over_capacity(capacity: int) -> None:
    rng = random.Random(capacity)
    lengths = [rng.randint(1, capacity) for _ in range(2000)]
    bins = pack_sequences(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) for b in bins)


def test_packing_is_deterministic() -> None:
    lengths = lognormal_lengths(3000, seed=1)
    assert pack_sequences(lengths, 4096) == pack_sequences(list(lengths), 4096)


def test_exact_fit_and_trivial_cases() -> None:
    assert pack_sequences([], 8) == []
    assert pack_sequences([8, 8], 8) == [[0], [1]]
    assert sorted(pack_sequences([5, 3, 4, 4], 8)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    ("lengths", "capacity", "message"),
    [([3, 9], 8, "sample 1 has 9 tokens"), ([3, 0], 8, "sample 1 is empty"), ([1], 0, "capacity")],
)
def test_unpackable_input_raises(lengths: list[int], capacity: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_sequences(lengths, capacity)


def test_fill_on_lognormal_lengths() -> None:
    lengths = lognormal_lengths(5000)
    bins = pack_sequences(lengths, 4096)
    stats = PackingStats.from_bins(bins, lengths, 4096)
    assert stats.samples == 5000 and stats.tokens == sum(lengths)
    assert stats.rows >= math.ceil(sum(lengths) / 4096)
    assert stats.fill >= 0.97, stats.summary()


def test_packing_scales_to_large_datasets() -> None:
    lengths = lognormal_lengths(200_000, seed=2)
    start = time.perf_counter()
    bins = pack_sequences(lengths, 4096)
    assert time.perf_counter() - start < 10  # ~0.5 s here; an O(n^2) packer would take minutes
    assert sum(len(b) for b in bins) == len(lengths)


def best_fit_on_lists(lengths: list[int], capacity: int) -> list[list[int]]:
    """The packer as it was first written, one sample at a time over Python lists: the reference the flat-array
    packer must reproduce exactly (the rows, their order and the samples in each)."""
    from bisect import bisect_left, insort

    rows: list[list[int]] = []
    rows_by_room: dict[int, list[int]] = {}
    rooms: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in dataset order
        size = lengths[index]
        k = bisect_left(rooms, size)
        if k == len(rooms):
            row, room = len(rows), capacity
            rows.append([])
        else:
            room = rooms[k]
            row = rows_by_room[room].pop()
            if not rows_by_room[room]:
                del rows_by_room[room], rooms[k]
        rows[row].append(index)
        if room - size > 0:
            if room - size not in rows_by_room:
                insort(rooms, room - size)
            rows_by_room.setdefault(room - size, []).append(row)
    return [sorted(row) for row in rows]


@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 512, 4096])
def test_flat_array_packing_is_the_list_packing_exactly(capacity: int) -> None:
    rng = random.Random(capacity)
    for trial in range(60):
        # Few distinct sizes (long runs of equal samples placed as one slice) as well as many.
        top = rng.choice([capacity, max(1, capacity // 2), max(1, capacity // 3), max(1, capacity // 10)])
        choices = rng.sample(range(1, top + 1), min(top, rng.choice([2, 5, top])))
        lengths = [rng.choice(choices) for _ in range(rng.randint(0, 500))]
        expected = best_fit_on_lists(lengths, capacity)
        assert pack_sequences(lengths, capacity) == expected, (capacity, trial)
        members, bounds = pack_offsets(np.asarray(lengths, dtype=np.int64), capacity)
        assert members.dtype == bounds.dtype == np.int32
        assert [members[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)] == expected


def test_flat_array_packing_on_lognormal_lengths() -> None:
    lengths = [min(512, n) for n in lognormal_lengths(20_000, seed=3, median=120)]
    assert pack_sequences(lengths, 512) == best_fit_on_lists(lengths, 512)


# --- packed rows and boundary labels ---------------------------------------------------------


def test_pack_examples_matches_the_docstring_example() -> None:
    a = {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]}
    b = {"input_ids": [20, 21, 22, 23], "labels": [-100, -100, 22, 23]}
    c = {"input_ids": [30, 31], "labels": [30, 31]}
    [row] = pack_examples([a, b, c], capacity=10)
    assert row == {
        "input_ids": [10, 11, 12, 20, 21, 22, 23, 30, 31],
        "labels": [-100, 11, 12, -100, -100, 22, 23, -100, 31],
        "position_ids": [0, 1, 2, 0, 1, 2, 3, 0, 1],
        "seq_lens": [3, 4, 2],
    }
    assert c["labels"] == [30, 31]  # inputs are not modified


def test_pack_examples_keeps_tokens_and_masks_each_first_label() -> None:
    gen = torch.Generator().manual_seed(0)
    examples = [random_example(n, prompt=0, gen=gen) for n in lognormal_lengths(300, median=20)]
    rows = pack_examples(examples, capacity=128)
    stats = PackingStats.from_rows(rows, 128)
    assert stats.samples == 300 and stats.tokens == sum(len(e["input_ids"]) for e in examples)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == len(row["seq_lens"])
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
    # No prompt masking here, so exactly one label per sample (its first) was dropped.
    assert sum(count_label_tokens(torch.tensor([r["labels"]])) for r in rows) == stats.tokens - 300


def test_pack_examples_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        pack_examples([{"input_ids": [1, 2], "labels": [2]}], capacity=8)


# --- collators -------------------------------------------------------------------------------


def test_packed_collator_pads_with_a_separate_segment() -> None:
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]},
    ]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0]]
    # Boundary labels are re-masked by the collator even though this row did not mask them.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100], [-100, 2, 3] + [-100] * 5]
    assert batch["num_label_tokens"] == 5
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 11, 16]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5


def test_packed_collator_rejects_broken_positions() -> None:
    row = {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 2, 3]}
    with pytest.raises(ValueError, match="restart at 0"):
        PackedCollator()([row])


def test_varlen_kwargs_match_transformers() -> None:
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])
    ours = varlen_kwargs(position_ids)
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    assert torch.equal(ours["cu_seq_lens_q"], cu_q) and ours["max_length_q"] == int(max_q)


def test_padded_collator_shapes_and_masks() -> None:
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = PaddedCollator(pad_token_id=9, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3] + [9] * 5, [4] + [9] * 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    assert batch["labels"].tolist() == [[-100, 2, 3] + [-100] * 5, [4] + [-100] * 7]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert batch["num_label_tokens"] == 2  # the first column is never a target
    assert PaddedCollator()(rows)["input_ids"].shape == (2, 3)
    assert PaddedCollator(pad_token_id=None)(rows)["input_ids"][1].tolist() == [4, 0, 0]  # no pad token: 0
    assert PaddedCollator(sequence_len=6, pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, 6)
    assert PaddedCollator(sequence_len=16, pad_to_sequence_len=True)(rows)["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="more than sequence_len"):
        PaddedCollator(sequence_len=2)(rows)


def test_model_inputs_selects_forward_arguments() -> None:
    batch = PackedCollator()([{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 1]}])
    inputs = model_inputs(batch)
    assert inputs["use_cache"] is False
    assert set(inputs) == {
        "use_cache",
        "input_ids",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
    }
    assert "labels" in model_inputs(batch, include_labels=True)


# --- packed == unpacked on a real model ------------------------------------------------------

LENGTHS = [7, 11, 5, 9, 6]  # packs (capacity 24) into rows [11, 9] and [7, 5, 6]: 20 and 18 tokens


@pytest.fixture(scope="module")
def examples() -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [random_example(n, prompt=i % 3, gen=gen) for i, n in enumerate(LENGTHS)]


def packed_batch(examples: list[dict[str, list[int]]], pad_to_multiple_of: int | None):
    rows = pack_examples(examples, capacity=24)
    assert sorted(sum(r["seq_lens"]) for r in rows) == [18, 20]  # two rows of different lengths
    assert max(len(r["seq_lens"]) for r in rows) >= 3  # some sample has neighbours on both sides
    return rows, PackedCollator(pad_to_multiple_of=pad_to_multiple_of)(rows)


def spans(row: dict[str, list[int]]):
    """``(start, end)`` of each sample of a packed row."""
    start = 0
    for n in row["seq_lens"]:
        yield start, start + n
        start += n


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causally shifted cross-entropy, summed over label tokens (what the training loop normalises)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def check_packed_equals_alone(model, examples, pad_to_multiple_of, device: str, atol: float) -> None:
    rows, batch = packed_batch(examples, pad_to_multiple_of)
    with torch.no_grad():
        packed = model(**model_inputs(batch, device)).logits.float()
        for r, row in enumerate(rows):
            for start, end in spans(row):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]], device=device)).logits
                torch.testing.assert_close(packed[r, start:end], alone[0].float(), rtol=0, atol=atol)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(examples, attn_implementation: str, pad_to_multiple_of) -> None:
    check_packed_equals_alone(tiny_llama(attn_implementation), examples, pad_to_multiple_of, "cpu", atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_sum_of_unpacked_losses(examples, attn_implementation: str) -> None:
    model = tiny_llama(attn_implementation)
    _, batch = packed_batch(examples, pad_to_multiple_of=8)
    with torch.no_grad():
        expected = sum(
            summed_token_loss(
                model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]])
            )
            for e in examples
        )
        expected_count = sum(count_label_tokens(torch.tensor([e["labels"]])) for e in examples)
        packed = summed_token_loss(model(**model_inputs(batch)).logits, batch["labels"])
        # The model's own loss, normalised by the step's label-token count, agrees too.
        n = batch["num_label_tokens"]
        model_loss = model(**model_inputs(batch, include_labels=True), num_items_in_batch=n).loss
    assert n == expected_count
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model_loss * n, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padded_batch_matches_unpacked(examples, attn_implementation: str) -> None:
    model = tiny_llama(attn_implementation)
    batch = PaddedCollator(pad_to_multiple_of=8)(examples)
    with torch.no_grad():
        padded = model(**model_inputs(batch)).logits
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(padded[i, : len(e["input_ids"])], alone, rtol=0, atol=1e-5)
        expected = sum(
            summed_token_loss(
                model(input_ids=torch.tensor([e["input_ids"]])).logits, torch.tensor([e["labels"]])
            )
            for e in examples
        )
    torch.testing.assert_close(summed_token_loss(padded, batch["labels"]), expected, rtol=1e-5, atol=1e-4)


# --- GPU-only backends -----------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_packed_logits_equal_unpacked_flash_attention_2(examples) -> None:
    """flash-attn uses the collator's cu_seq_lens (its position_ids inference only works for batch 1)."""
    pytest.importorskip("flash_attn")
    model = tiny_llama("flash_attention_2", device="cuda", dtype=torch.bfloat16)
    check_packed_equals_alone(model, examples, pad_to_multiple_of=8, device="cuda", atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flex_attention"])
def test_packed_logits_equal_unpacked_on_cuda(examples, attn_implementation: str) -> None:
    """On CUDA; flex_attention is here only: its compiled CPU kernel is slow and gave wrong results (torch 2.13)."""
    model = tiny_llama(attn_implementation, device="cuda")
    check_packed_equals_alone(model, examples, pad_to_multiple_of=8, device="cuda", atol=1e-4)


def _causal_attention(q, k, v, softmax_scale, causal):
    """``(batch, L, heads, dim)`` attention, as flash-attn lays it out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=softmax_scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def _reference_flash_functions(calls: list[str]):
    """Pure-torch stand-ins for flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func`` (same signatures)."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        calls.append("dense")
        return _causal_attention(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=None,
        max_seqlen_k=None,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        **_,
    ):
        calls.append("varlen")
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and isinstance(max_seqlen_q, int)
        bounds = cu_seqlens_q.tolist()
        segments = [
            _causal_attention(q[None, s:e], k[None, s:e], v[None, s:e], softmax_scale, causal)[0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(segments)

    return flash_attn_func, flash_attn_varlen_func


def test_flash_attention_dispatch_uses_cu_seq_lens(examples, monkeypatch) -> None:
    """transformers' real flash-attn dispatch (``_flash_attention_forward``) with a torch kernel, on CPU.

    It checks what the GPU test cannot without flash-attn installed: with a batch of 2 packed rows the
    collator's ``cu_seq_lens_*`` reach the kernel and select the varlen path (transformers only infers
    boundaries from ``position_ids`` for batch size 1).
    """
    fa_utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not hasattr(fa_utils, "lazy_import_flash_attention") or not hasattr(
        fa_utils, "_lazy_define_process_function"
    ):
        pytest.skip("this transformers version loads flash-attn differently")
    calls: list[str] = []
    dense, varlen = _reference_flash_functions(calls)
    kernels = (
        (dense, varlen, None, fa_utils._pad_input, fa_utils._unpad_input),
        (fa_utils._lazy_define_process_function(varlen), dict),
    )
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    monkeypatch.setitem(
        ALL_ATTENTION_FUNCTIONS._global_mapping, "axlora_test_varlen", flash_attention_forward
    )
    monkeypatch.setitem(
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "axlora_test_varlen", flash_attention_mask
    )

    check_packed_equals_alone(tiny_llama("axlora_test_varlen"), examples, 8, "cpu", atol=1e-5)
    assert calls.count("varlen") == 2  # the packed batch: one call per layer, all varlen
    assert set(calls[2:]) == {"dense"}  # each sample alone: plain causal
