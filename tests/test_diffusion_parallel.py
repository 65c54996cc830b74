"""diffusion: under several processes: each process masks its own rows with its own draws, the loss is one global
token mean, and a resume masks every later step as the uninterrupted run did."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from axlora.data.collate import PaddedCollator
from axlora.data.diffusion_collate import DiffusionCollator, NoisePlan, mask_seed, noise_batch, step_collator
from axlora.train.diffusion import masked_diffusion_loss

from conftest import assert_same_final_adapter, logged, train_ok

MASK, BOS, EOS, PAD = 5, 1, 2, 3
PLAN = NoisePlan(mask_token_id=MASK, keep_visible=(BOS, EOS, PAD), seed=7)


def _rows(count: int) -> list[dict[str, list[int]]]:
    ids = [BOS, 7] + list(range(10, 50))
    return [{"input_ids": ids, "labels": [-100, -100] + ids[2:], "position_ids": list(range(len(ids)))}] * count


def _masks(collate, batches: int = 2) -> list[torch.Tensor]:
    return [collate(_rows(2))["input_ids"] == MASK for _ in range(batches)]


def test_training_masks_are_a_pure_function_of_seed_step_process_and_micro_batch():
    collator = DiffusionCollator(PaddedCollator(pad_token_id=PAD), PLAN)
    torch.manual_seed(0)  # every process seeds torch alike: the masks must not come from there
    first = _masks(step_collator(collator, 3, 0))
    torch.manual_seed(1)
    again = _masks(step_collator(collator, 3, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # a resumed step masks as it did
    other_process = _masks(step_collator(collator, 3, 1))
    other_step = _masks(step_collator(collator, 4, 0))
    for masks in (other_process, other_step):
        assert not any(torch.equal(a, b) for a, b in zip(first, masks, strict=True))
    assert not torch.equal(first[0], first[1])  # the micro batches of one step differ too
    seeds = {mask_seed(7, step, process, micro) for step in range(3) for process in range(3) for micro in range(3)}
    assert len(seeds) == 27 and mask_seed(7, 1, 2, 0) == mask_seed(7, 1, 2, 0) != mask_seed(8, 1, 2, 0)
    plain = PaddedCollator(pad_token_id=PAD)
    assert step_collator(plain, 3, 0) is plain


def test_the_loss_of_batches_split_over_processes_adds_up_to_the_loss_of_them_together():
    """Each process divides its token losses by the step's global count (``num_items_in_batch``), so the sum over
    processes is the loss of one process holding every row, not a mean of per-process means."""
    torch.manual_seed(0)
    batch = noise_batch(PaddedCollator(pad_token_id=PAD)(_rows(2)[:1] + [
        {"input_ids": [BOS, 7] + list(range(10, 20)), "labels": [-100, -100] + list(range(10, 20)),
         "position_ids": list(range(12))}]), PLAN)
    logits = torch.randn(*batch["input_ids"].shape, 64)
    weights, labels = batch["diffusion_weights"], batch["labels"]
    count = batch["num_label_tokens"]

    def loss(rows: slice):
        return masked_diffusion_loss(logits[rows], labels[rows], 64, num_items_in_batch=count,
                                     diffusion_weights=weights[rows])

    assert float(loss(slice(0, 1)) + loss(slice(1, 2))) == pytest.approx(float(loss(slice(0, 2))), rel=1e-6)
    assert count == 40 + 10  # answer tokens of both rows, masked or not (supervised_token_mean)


@pytest.mark.slow
def test_two_processes_train_with_diffusion_and_resume_exactly(make_config, tmp_path):
    settings = {"num_processes": 2, "micro_batch_size": 1, "save_steps": 2, "attn_implementation": "sdpa",
                "diffusion": {"mask_token_id": 0}}  # <unk>: a special token the rows never hold
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = train_ok(make_config("full.yml", output_dir=str(full), **settings))
    assert "launch: 2 processes" in result.stdout
    assert "training masks seeded by seed, step, process and micro batch" in result.stdout
    losses = logged(full)
    assert len(losses) == 4 and all(math.isfinite(loss) and loss > 0 for loss in losses)

    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    result = train_ok(make_config("resume.yml", output_dir=str(resumed), resume_from_checkpoint="auto", **settings))
    assert "resumed from checkpoints/step-2 at step 2/4" in result.stdout
    assert logged(resumed) == losses[2:]  # the same masks at steps 3 and 4, on both processes
    assert_same_final_adapter(resumed, full)
