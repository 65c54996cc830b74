"""Axolotl's small keys do what they do there: batch_size, evals_per_epoch: 0, lr_quadratic_warmup, the pure-dtype
switches, dataset_exact_deduplication, curriculum_sampling, dataloader_drop_last and the attention names that are not transformers
backends."""

from __future__ import annotations

import pytest
import torch

from axlora.config.load import load_config
from axlora.config.schema import Config
from axlora.core.errors import ConfigError, UserError
from axlora.data.demo_rows import addition_rows, write_jsonl
from axlora.data.prepare import prepare_data
from axlora.model.load import model_load_kwargs
from axlora.model.tokenizer import tokenizer_fingerprint
from axlora.train.intervals import evaluates_at, saves_at
from axlora.train.length_groups import build_data_order
from axlora.train.optim import build_lr_scheduler
from axlora.train.precision import choose_precision

BASE = {"base_model": "/models/x", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "lora_target_linear": True,
        "max_steps": 10}


def config(**keys) -> Config:
    return Config.model_validate({**BASE, **keys})


def problems(make_config, **keys) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(make_config(**keys), log=lambda _n: None)
    return info.value.problems


def test_batch_size_sets_the_accumulation_as_axolotl_does(make_config):
    loaded = load_config(make_config(batch_size=16, micro_batch_size=4), log=lambda _n: None)
    assert loaded.gradient_accumulation_steps == 4 and loaded.effective_batch_per_process() == 16
    assert config(batch_size=10, micro_batch_size=4).gradient_accumulation_steps == 2  # Axolotl floors
    both = problems(make_config, batch_size=16, gradient_accumulation_steps=2)
    assert any("batch_size / gradient_accumulation_steps: set one of them" in p for p in both)
    assert any("smaller than micro_batch_size" in p for p in problems(make_config, batch_size=2, micro_batch_size=4))


def test_evals_per_epoch_zero_evaluates_only_at_the_end():
    quiet = config(evals_per_epoch=0, saves_per_epoch=0)
    assert [s for s in range(1, 21) if evaluates_at(quiet, s, 20, 5)] == [20]
    assert not any(saves_at(quiet, s, 20, 5) for s in range(1, 21))
    assert [s for s in range(1, 21) if evaluates_at(config(evals_per_epoch=1), s, 20, 5)] == [5, 10, 15, 20]


def test_quadratic_warmup_then_cosine():
    cfg = config(lr_quadratic_warmup=True, warmup_steps=4, learning_rate=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.0, 1 / 16, 4 / 16, 9 / 16, 1.0])  # linear would give 0.25, 0.5, 0.75
    assert rates[8] == pytest.approx(0.5)  # half way through the cosine
    with pytest.raises(ValueError, match="lr_quadratic_warmup: applies to lr_scheduler: cosine only"):
        config(lr_quadratic_warmup=True, lr_scheduler="linear")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answers")
def test_pure_dtype_switches_choose_the_weight_dtype():
    assert choose_precision(config(bfloat16=True)).torch_dtype == torch.bfloat16  # bf16 default is auto: fp32 on CPU
    assert choose_precision(config(float32=True, bf16="auto")).torch_dtype == torch.float32
    # bfloat16: auto (in some of Axolotl's examples) is bf16: auto: bfloat16 only where a GPU supports it
    assert choose_precision(config(bfloat16="auto")).torch_dtype == torch.float32
    assert choose_precision(config(bfloat16="auto", bf16=True)).torch_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16: auto loads the weights in bfloat16, bf16: false"):
        config(bfloat16="auto", bf16=False)
    with pytest.raises(ValueError, match="float16.*write fp16: true"):
        config(float16="auto")
    with pytest.raises(UserError, match="float16: float16 training needs a CUDA GPU"):
        choose_precision(config(float16=True))
    with pytest.raises(ValueError, match="bfloat16: true loads the weights in bfloat16, bf16: false"):
        config(bfloat16=True, bf16=False)
    with pytest.raises(ValueError, match="choose one precision"):
        config(float16=True, bf16=True)


def test_curriculum_sampling_keeps_the_prepared_order_every_epoch():
    rows = [{"input_ids": [1] * (i + 1)} for i in range(6)]
    ordered = build_data_order(config(curriculum_sampling=True, micro_batch_size=2), rows, world_size=1)
    assert [ordered.step_rows(step) for step in range(6)] == [[0, 1], [2, 3], [4, 5]] * 2
    shuffled = build_data_order(config(micro_batch_size=2), rows, world_size=1)
    assert [shuffled.step_rows(step) for step in range(3)] != [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="curriculum_sampling / group_by_length"):
        config(curriculum_sampling=True, group_by_length=True)


def test_dataloader_drop_last_leaves_out_the_short_last_step_of_each_epoch():
    rows = [{"input_ids": [1] * (i + 1)} for i in range(7)]
    for grouped in (False, True):
        keeps = build_data_order(config(micro_batch_size=3, group_by_length=grouped), rows, world_size=1)
        drops = build_data_order(config(micro_batch_size=3, group_by_length=grouped, dataloader_drop_last=True),
                                 rows, world_size=1)
        assert (keeps.steps_per_epoch, drops.steps_per_epoch) == (3, 2)
        assert [len(keeps.step_rows(step)) for step in range(3)] == [3, 3, 1]
        assert [len(drops.step_rows(step)) for step in range(4)] == [3, 3, 3, 3]  # epoch 2 starts at step 2
        assert drops.total_steps(num_epochs=2, max_steps=None) == 4
    assert build_data_order(config(micro_batch_size=8, dataloader_drop_last=True), rows, 1).steps_per_epoch == 1


def test_exact_deduplication_drops_repeated_rows_before_the_split(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = addition_rows(40, seed=5)
    data, more = tmp_path / "rows.jsonl", tmp_path / "more.jsonl"
    write_jsonl(rows[:30] + rows[:10], data)  # ten rows twice in one file
    write_jsonl(rows[20:40], more)  # ten of them again in another
    dataset = [{"path": str(data), "type": "alpaca"}, {"path": str(more), "type": "alpaca"}]

    def prepared(dedup: bool):
        cfg = Config.model_validate({**BASE, "datasets": dataset, "sequence_len": 96, "val_set_size": 5,
                                     "output_dir": str(tmp_path / "out"), "dataset_exact_deduplication": dedup})
        return prepare_data(cfg, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda _l: None)

    plain, unique = prepared(False), prepared(True)
    assert len(plain.train) + len(plain.val) == 60
    assert len(unique.train) + len(unique.val) == 40 and unique.fingerprint != plain.fingerprint
    train = {tuple(row["input_ids"]) for row in unique.train}
    assert len(train) == len(unique.train) and not train & {tuple(row["input_ids"]) for row in unique.val}


def test_attention_names_that_are_not_backends_run_sdpa_with_a_note(make_config, tiny_model_dir):
    for keys in ({"attn_implementation": "xformers"}, {"xformers_attention": True}, {"sage_attention": True}):
        loaded = load_config(make_config(**keys), log=lambda _n: None)
        notes: list[str] = []
        kwargs = model_load_kwargs(loaded, torch.float32, str(tiny_model_dir), log=notes.append)
        assert kwargs["attn_implementation"] == "sdpa"
        assert notes[0].startswith("attention: sdpa (") and "not a transformers backend" in notes[0]


def test_an_attention_switch_beside_attn_implementation_must_name_the_same_kernel():
    hub = config(flash_attention=True, attn_implementation="kernels-community/vllm-flash-attn3")
    assert hub.attention_implementation() == "kernels-community/vllm-flash-attn3"
    assert config(sdp_attention=True, attn_implementation="sdpa").attention_implementation() == "sdpa"
    with pytest.raises(ValueError, match="attn_implementation / flash_attention: choose one"):
        config(flash_attention=True, attn_implementation="sdpa")


def test_gemma4_template_thinking_switch_and_generation_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    from axlora.config.chat_template_catalog import GEMMA4

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [{"role": "user", "content": "1+2"}]
    plain = tokenizer.apply_chat_template(chat, chat_template=GEMMA4, tokenize=False, add_generation_prompt=True)
    assert plain == "<s><|turn>user\n1+2<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    thinking = tokenizer.apply_chat_template(chat, chat_template=GEMMA4, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=True)
    assert thinking == "<s><|turn>system\n<|think|><turn|>\n<|turn>user\n1+2<turn|>\n<|turn>model\n"


def test_warmup_steps_below_one_is_a_fraction_of_the_steps_as_in_transformers_5():
    assert config(warmup_steps=0.1).derived_warmup_steps(50) == 5
    assert config(warmup_steps=0.01).derived_warmup_steps(50) == 1  # rounded up, as transformers does
    assert config(warmup_steps=10).derived_warmup_steps(50) == 10
    assert config(warmup_steps=0).derived_warmup_steps(50) == 0
