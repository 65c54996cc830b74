"""Axolotl's optimizer and schedule keys do what they do there: optim_args, the cosine floor, one_cycle and
lr_scheduler_kwargs, LoRA+, the embedding learning rate, NEFTune and do_causal_lm_eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axlora.config.load import load_config
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.train.causal_lm_eval import start_causal_lm_eval, text_scores
from axlora.train.optim import (
    build_lr_scheduler,
    cosine_min_lr_factor,
    resolve_optimizer,
    scheduler_arguments,
)
from axlora.train.recipe import run_training

from conftest import main_in_process

BASE = {"base_model": "/models/x", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "lora_target_linear": True,
        "max_steps": 10}


def config(**keys) -> Config:
    return Config.model_validate({**BASE, **keys})


def train(make_config, name: str, **keys) -> tuple[Path, list[dict], list[str]]:
    """The real training loop in this process: the run's output_dir, its metrics rows and what it printed."""
    out = make_config().parent / name
    lines: list[str] = []
    run_training(load_config(make_config(f"{name}.yml", output_dir=str(out), **keys), log=lines.append),
                 log=lines.append)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return out, rows, lines


def rates(cfg: Config, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


# ---- optim_args -----------------------------------------------------------------------------------------------


def test_optim_args_reach_the_constructor_as_a_string_or_a_mapping():
    _, kwargs = resolve_optimizer(config(optim_args="amsgrad=true, eps=1e-6"))
    assert kwargs["amsgrad"] is True and kwargs["eps"] == 1e-6
    cls, kwargs = resolve_optimizer(config(optimizer="sgd", optim_args={"momentum": 0.9, "nesterov": True}))
    optimizer = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match="optim_args"):
        config(optim_args="momentum")


def test_an_argument_the_optimizer_does_not_take_exits_2_naming_it(make_config, capsys):
    result = main_in_process(capsys, "train", str(make_config(optim_args="amsgrd=true")))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stdout + result.stderr
    assert "optim_args: AdamW (optimizer: adamw_torch) takes no argument 'amsgrd' (did you mean 'amsgrad'?)" in message
    assert "it takes: amsgrad, betas," in message


@pytest.mark.slow
def test_optim_args_change_what_the_loop_optimizes(make_config):
    _, plain, _ = train(make_config, "plain")
    _, ascending, _ = train(make_config, "maximize", optim_args="maximize=true")
    assert plain[0]["loss"] == ascending[0]["loss"]  # the same start
    assert plain[-1]["loss"] < plain[0]["loss"] and ascending[-1]["loss"] > ascending[0]["loss"]


# ---- the schedule -----------------------------------------------------------------------------------------------


def test_cosine_floor_and_its_constant_tail():
    floor = rates(config(cosine_min_lr_ratio=0.1, warmup_steps=2, learning_rate=1.0), 12)
    assert floor[:3] == pytest.approx([0.0, 0.5, 1.0]) and min(floor[2:]) >= 0.1 - 1e-9
    assert floor[-1] == pytest.approx(cosine_min_lr_factor(11, 2, 12, 0.1)) and floor[-1] > 0.1
    held = rates(config(cosine_min_lr_ratio=0.1, cosine_constant_lr_ratio=0.5, warmup_steps=2, learning_rate=1.0), 12)
    assert held[6:] == pytest.approx([0.1] * 6) and held[4] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="cosine_min_lr_ratio: applies to lr_scheduler: cosine only"):
        config(cosine_min_lr_ratio=0.1, lr_scheduler="linear")
    with pytest.raises(ValueError, match="cosine_constant_lr_ratio: holds the minimum of cosine_min_lr_ratio"):
        config(cosine_constant_lr_ratio=0.5)


def test_one_cycle_starts_at_the_div_factor_and_schedule_arguments_are_checked():
    cycle = rates(config(lr_scheduler="one_cycle", lr_div_factor=10, warmup_steps=3, learning_rate=1.0), 10)
    assert cycle[0] == pytest.approx(0.1) and cycle[2] == pytest.approx(1.0) and cycle[-1] < 0.01
    assert rates(config(lr_scheduler="one_cycle", warmup_steps=3, learning_rate=1.0), 10)[0] == pytest.approx(1 / 25)
    assert rates(config(lr_scheduler="one_cycle", warmup_steps=1, learning_rate=1.0), 4)[0] > 0.5  # no warm-up
    restarts = rates(config(lr_scheduler="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2},
                            learning_rate=1.0), 10)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.2  # the second cycle starts over
    with pytest.raises(UserError, match="lr_scheduler_kwargs: lr_scheduler: polynomial takes no argument 'powr' "
                                        r"\(did you mean 'power'\?\); it takes: lr_end, power"):
        scheduler_arguments(config(lr_scheduler="polynomial", lr_scheduler_kwargs={"powr": 2}))
    with pytest.raises(ValueError, match="lr_div_factor: applies to lr_scheduler: one_cycle only"):
        config(lr_div_factor=10)


@pytest.mark.slow
def test_the_loop_follows_the_cosine_floor(make_config):
    _, rows, _ = train(make_config, "floor", max_steps=6, cosine_min_lr_ratio=0.5, cosine_constant_lr_ratio=0.5)
    logged = [row["lr"] for row in rows]
    assert logged == pytest.approx([1e-2 * cosine_min_lr_factor(s, 0, 6, 0.5, 0.5) for s in range(6)])
    assert logged[-3:] == pytest.approx([5e-3] * 3)  # plain cosine would be near 0 by now


# ---- LoRA+ and the embedding learning rate ------------------------------------------------------------------------


@pytest.mark.slow
def test_loraplus_moves_the_b_matrices_ratio_times_faster(make_config):
    plain, _, _ = train(make_config, "plain", max_steps=2)
    plus, _, _ = train(make_config, "plus", max_steps=2, loraplus_lr_ratio=16)

    def mean_b(out: Path) -> float:
        weights = load_file(out / "final" / "adapter_model.safetensors")
        return torch.stack([w.abs().mean() for name, w in weights.items() if "lora_B" in name]).mean().item()

    # B starts at zero and Adam's steps scale with the learning rate: B is about 16 times larger
    assert 8 < mean_b(plus) / mean_b(plain) < 32
    with pytest.raises(ValueError, match="loraplus_lr_embedding: applies with loraplus_lr_ratio only"):
        config(loraplus_lr_embedding=1e-5)


@pytest.mark.slow
def test_embedding_lr_sets_the_rate_of_trained_embeddings(make_config, tiny_model_dir):
    base = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]

    def embedding_change(name: str, **keys) -> float:
        out, _, lines = train(make_config, name, max_steps=2, lora_modules_to_save=["embed_tokens"], **keys)
        saved = load_file(out / "final" / "adapter_model.safetensors")
        [embedding] = [w for key, w in saved.items() if "embed_tokens" in key]
        return (embedding - base).abs().max().item()

    assert embedding_change("plain") > 1e-3
    assert embedding_change("still", embedding_lr=1e-9) < 1e-6
    assert embedding_change("scaled", embedding_lr_scale=1e-7) < 1e-6
    with pytest.raises(ValueError, match="embedding_lr / embedding_lr_scale: set one of them"):
        config(embedding_lr=1e-5, embedding_lr_scale=0.1)


# ---- NEFTune ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_neftune_noise_in_training_steps_only(make_config):
    _, plain, _ = train(make_config, "plain", max_steps=1, val_set_size=8, eval_on_start=True)
    _, noisy, lines = train(make_config, "noisy", max_steps=1, val_set_size=8, eval_on_start=True,
                            neftune_noise_alpha=5)
    assert "neftune: noise alpha 5 on the input embeddings in training steps" in lines
    assert noisy[0]["eval_loss"] == plain[0]["eval_loss"]  # evaluation sees the embeddings as they are
    assert noisy[1]["loss"] != plain[1]["loss"]  # the same first batch, with noise


def test_neftune_alias_and_switched_off_values(make_config, tmp_path):
    assert load_config(make_config(noisy_embedding_alpha=5), log=lambda _n: None).neftune_noise_alpha == 5
    assert not load_config(make_config(neftune_noise_alpha=0), log=lambda _n: None).uses_neftune()


# ---- do_causal_lm_eval ----------------------------------------------------------------------------------------------


def test_text_scores_are_sacrebleu_corpus_scores():
    pytest.importorskip("sacrebleu")
    same = text_scores(["1 + 2 = 3", "4 + 4 = 8"], ["1 + 2 = 3", "4 + 4 = 8"], ["sacrebleu", "chrf", "ter"])
    assert same == pytest.approx({"eval_sacrebleu": 100.0, "eval_chrf": 100.0, "eval_ter": 0.0})
    wrong = text_scores(["the cat", "a dog"], ["1 + 2 = 3", "4 + 4 = 8"], ["sacrebleu", "ter"])
    assert wrong["eval_sacrebleu"] < 1 and wrong["eval_ter"] >= 100


def test_validation_rows_split_into_prompt_and_reference(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = tokenizer("42", add_special_tokens=False).input_ids
    rows = [{"input_ids": [5, 6, 7, *answer], "labels": [-100, -100, -100, *answer]},
            {"input_ids": [5, 6], "labels": [5, 6]}]  # no prompt: nothing to complete
    lines: list[str] = []
    causal = start_causal_lm_eval(config(do_causal_lm_eval=True), tokenizer, rows, lines.append)
    assert causal.prompts == [[5, 6, 7]] and causal.references == ["42"] and causal.rows == rows[:1]
    assert lines[-1].startswith("causal_lm_eval: ")
    with pytest.raises(UserError, match="do_causal_lm_eval: no validation row has a prompt to complete"):
        start_causal_lm_eval(config(do_causal_lm_eval=True), tokenizer, rows[1:], lines.append)
    with pytest.raises(ValueError, match="comet scores with a COMET model"):
        config(do_causal_lm_eval=True, eval_causal_lm_metrics=["comet"])


@pytest.mark.slow
def test_causal_lm_eval_logs_its_scores_beside_eval_loss(make_config):
    pytest.importorskip("sacrebleu")
    _, rows, lines = train(make_config, "scored", max_steps=1, val_set_size=8, eval_on_start=True,
                           do_causal_lm_eval=True, eval_max_new_tokens=4)
    assert "causal_lm_eval: sacrebleu, chrf, ter, perplexity on 8 validation row(s), up to 4 new tokens each" in lines
    evaluated = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evaluated] == [0, 1]
    for row in evaluated:
        assert row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))  # all 8 rows: exp(eval_loss)
        assert 0 <= row["eval_sacrebleu"] <= 100 and 0 <= row["eval_chrf"] <= 100 and row["eval_ter"] >= 0
    _, capped, _ = train(make_config, "capped", max_steps=1, val_set_size=8, eval_on_start=True,
                         do_causal_lm_eval=True, eval_causal_lm_metrics=["perplexity"], eval_causal_lm_max_rows=2)
    assert set(capped[0]) == {"step", "eval_loss", "eval_perplexity"}
    assert capped[0]["eval_perplexity"] != pytest.approx(math.exp(capped[0]["eval_loss"]))  # 2 of the 8 rows


def test_without_sacrebleu_only_perplexity_is_computed_and_a_note_says_so(monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    from axlora.train import causal_lm_eval

    monkeypatch.setattr(causal_lm_eval, "_has_sacrebleu", lambda: False)
    lines: list[str] = []
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}]
    causal = start_causal_lm_eval(config(do_causal_lm_eval=True), AutoTokenizer.from_pretrained(tiny_model_dir), rows,
                                  lines.append)
    assert causal.metrics == ["perplexity"]
    assert lines[0] == ("note: do_causal_lm_eval: sacrebleu, chrf, ter need the sacrebleu package, which is not "
                        "installed (pip install sacrebleu); they are not computed")


def test_causal_lm_eval_settings_without_the_switch_get_a_note(make_config):
    notes: list[str] = []
    load_config(make_config(eval_causal_lm_metrics=["chrf"], eval_max_new_tokens=16), log=notes.append)
    assert [note.split(": ", 2)[-1] for note in notes] == [
        "'eval_max_new_tokens' has no effect in axlora without do_causal_lm_eval: true.",
        "'eval_causal_lm_metrics' has no effect in axlora without do_causal_lm_eval: true.",
    ]
    notes.clear()
    load_config(make_config(do_causal_lm_eval=True, val_set_size=4, eval_max_new_tokens=16), log=notes.append)
    assert notes == []
