"""Keys of Axolotl's example configs with Axolotl's meaning: the precision switches, the eval prediction table,
the MoE router loss, the best adapter by a named metric, the default length of a run and FSDP's final save."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from axlora.config.fsdp import fsdp_settings
from axlora.config.load import load_config
from axlora.core.errors import ConfigError, UserError
from axlora.train.early_stopping import EarlyStopping
from axlora.train.eval_table import EVAL_PREDICTIONS
from axlora.train.integrations import start_integrations
from axlora.train.router_aux import router_aux_coefficient

from conftest import logged, train_ok

BASE = """\
base_model: NousResearch/Llama-3.2-1B
datasets:
  - path: yahma/alpaca-cleaned
    type: alpaca
lora_target_linear: true
"""


def load(tmp_path: Path, text: str, notes: list | None = None):
    path = tmp_path / "axolotl.yml"
    path.write_text(BASE + text)
    return load_config(path, log=(notes.append if notes is not None else lambda _note: None))


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


# ---- validation: no model needed ---------------------------------------------------------------------------------

def test_float16_auto_is_refused_as_axolotl_refuses_it_and_bfloat16_auto_is_bf16_auto(tmp_path):
    [problem] = problems_of(tmp_path, "float16: auto\n")
    assert "float16: true or false (Axolotl's own schema refuses 'auto' here too)" in problem
    assert "fp16: true" in problem
    assert load(tmp_path, "float16: true\n").model_dump()["float16"] is True
    assert load(tmp_path, "bfloat16: auto\n").model_dump()["bfloat16"] == "auto"


def test_a_config_without_epochs_or_steps_trains_one_epoch_as_in_axolotl(tmp_path):
    config = load(tmp_path, "")
    assert config.num_epochs == 1 and config.max_steps is None


def test_eval_table_tokens_alone_get_a_note(tmp_path):
    notes: list[str] = []
    config = load(tmp_path, "eval_table_size:\neval_table_max_new_tokens: 64\n", notes)
    assert config.eval_table_size is None
    assert any("'eval_table_max_new_tokens' has no effect in axlora without eval_table_size" in n for n in notes)
    notes.clear()
    config = load(tmp_path, "eval_table_size: 5\neval_table_max_new_tokens: 64\nval_set_size: 0.1\n", notes)
    assert (config.eval_table_size, config.eval_table_max_new_tokens) == (5, 64)
    assert not any("eval_table" in n for n in notes)


@pytest.mark.parametrize(("text", "expected"), [
    ("", ("eval_loss", False)),
    ("metric_for_best_model: loss\n", ("eval_loss", False)),
    ("metric_for_best_model: eval_perplexity\ngreater_is_better: false\n", ("eval_perplexity", False)),
    ("metric_for_best_model: sacrebleu\n", ("eval_sacrebleu", True)),  # transformers: higher is better unless *loss
    ("metric_for_best_model: eval_loss\ngreater_is_better: true\n", ("eval_loss", True)),
])
def test_the_best_model_metric_reads_as_in_transformers(tmp_path, text, expected):
    assert load(tmp_path, "load_best_model_at_end: true\n" + text).best_metric() == expected


def test_the_best_model_needs_evaluations_and_a_logged_metric(tmp_path):
    with pytest.raises(UserError, match="load_best_model_at_end: needs validation rows"):
        EarlyStopping.from_config(load(tmp_path, "load_best_model_at_end: true\n"))
    early = EarlyStopping.from_config(load(tmp_path, "load_best_model_at_end: true\nval_set_size: 0.1\n"
                                                     "metric_for_best_model: sacrebleu\n"))
    assert early.enabled and not early.should_stop  # no patience: keep the best, never stop early
    with pytest.raises(UserError, match="'eval_sacrebleu' is not among the evaluation's metrics \\(eval_loss"):
        early.observe(1, {"eval_loss": 1.0, "eval_perplexity": 2.7}, model=None, parallel=SimpleNamespace(world_size=1))


def test_fsdp_final_state_dict_type_is_accepted_with_a_note_when_not_whole(tmp_path):
    fsdp = "fsdp_version: 2\nfsdp_config:\n  state_dict_type: FULL_STATE_DICT\n  final_state_dict_type: {}\n"
    whole = fsdp_settings(load(tmp_path, fsdp.format("FULL_STATE_DICT")))
    assert not any("final_state_dict_type" in note for note in whole.notes)
    sharded = fsdp_settings(load(tmp_path, fsdp.format("SHARDED_STATE_DICT")))
    assert any("final_state_dict_type SHARDED_STATE_DICT: final/ holds the whole adapter" in n for n in sharded.notes)


def test_router_loss_needs_a_model_with_a_router(tmp_path):
    from transformers import LlamaConfig, Qwen3MoeConfig

    config = load(tmp_path, "router_aux_loss_coef: 0.01\n")
    with pytest.raises(UserError, match="has no mixture-of-experts router"):
        router_aux_coefficient(config, SimpleNamespace(config=LlamaConfig()))
    assert router_aux_coefficient(config, SimpleNamespace(config=Qwen3MoeConfig())) == 0.01
    assert router_aux_coefficient(load(tmp_path, ""), SimpleNamespace(config=LlamaConfig())) is None


class FakeWandb:
    """The part of wandb's API a run uses, recording what is sent (wandb is not a dependency of the tests)."""

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Artifact:
        def __init__(self, name, type, metadata=None):  # noqa: A002 - wandb's argument name
            self.name, self.type, self.metadata, self.dirs = name, type, metadata, []

        def add_dir(self, path):
            self.dirs.append(path)

    def __init__(self, monkeypatch):
        self.logged: list = []
        self.artifacts: list = []
        run = SimpleNamespace(id="r", log=lambda *a, **k: self.logged.append((a, k)),
                              log_artifact=lambda artifact, **k: self.artifacts.append((artifact, k)))
        module = types.ModuleType("wandb")
        module.init = lambda **_kwargs: run
        module.Table, module.Artifact = self.Table, self.Artifact
        monkeypatch.setitem(sys.modules, "wandb", module)


def test_wandb_log_model_checkpoint_uploads_each_checkpoint(make_config, monkeypatch, tmp_path):
    fake = FakeWandb(monkeypatch)
    config = load_config(make_config(wandb_project="p", wandb_log_model="checkpoint"), log=lambda _n: None)
    integrations = start_integrations(config, log=lambda _m: None)
    integrations.checkpoint_saved(tmp_path / "checkpoints" / "step-2", 2)
    [(artifact, kwargs)] = fake.artifacts
    assert (artifact.name, artifact.type, artifact.dirs) == ("checkpoint-r", "model", [str(tmp_path / "checkpoints"
                                                                                           / "step-2")])
    assert kwargs == {"aliases": ["step-2", "latest"]}
    ended = load_config(make_config(wandb_project="p", wandb_log_model="end"), log=lambda _n: None)
    start_integrations(ended, log=lambda _m: None).checkpoint_saved(tmp_path, 3)
    assert len(fake.artifacts) == 1  # end: the final adapter only


def test_the_prediction_table_goes_to_wandb_as_a_table(make_config, monkeypatch):
    fake = FakeWandb(monkeypatch)
    calls = fake.logged
    config = load_config(make_config(wandb_project="p", wandb_mode="offline"), log=lambda _n: None)
    integrations = start_integrations(config, log=lambda _m: None)
    rows = [{"step": 3, "row": 0, "prompt": "2+2=", "reference": "4", "prediction": "5"}]
    integrations.log_table("eval_predictions", rows, 3)
    [((logged_row,), kwargs)] = calls
    table = logged_row["eval_predictions"]
    assert table.columns == ["step", "row", "prompt", "reference", "prediction"]
    assert table.data == [[3, 0, "2+2=", "4", "5"]] and kwargs == {"step": 3}


# ---- training runs on the tiny models ----------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_table_writes_predictions_at_each_evaluation_and_a_resume_keeps_its_own(make_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axlora.model.generate import Sampling, generate_texts, prompt_ids

    out = tmp_path / "out"
    config = make_config(max_steps=2, eval_steps=1, save_steps=1, val_set_size=8, eval_table_size=2,
                         eval_table_max_new_tokens=6)
    result = train_ok(config)
    assert "eval_table: predictions for 2 validation row(s)" in result.stdout
    rows = [json.loads(line) for line in (out / "logs" / EVAL_PREDICTIONS).read_text().splitlines()]
    assert [(row["step"], row["row"]) for row in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(row["prompt"] and row["reference"] for row in rows)
    assert any(row["prediction"] for row in rows)
    # resumed from step 1, the run replaces the rows of step 2 instead of adding a second set
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-1"]  # none at the last step
    train_ok(make_config("resume.yml", max_steps=2, eval_steps=1, save_steps=1, val_set_size=8, eval_table_size=2,
                         eval_table_max_new_tokens=6, resume_from_checkpoint="auto"))
    again = [json.loads(line) for line in (out / "logs" / EVAL_PREDICTIONS).read_text().splitlines()]
    assert [(row["step"], row["row"]) for row in again] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert again[:2] == rows[:2]
    rows = again
    # the last evaluation's predictions are what the final adapter generates for those prompts
    summary_config = load_config(config, log=lambda _n: None)
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(summary_config.base_model), out / "final")
    ids = [prompt_ids(tokenizer, row["prompt"]) for row in rows[2:]]
    expected = generate_texts(model, tokenizer, ids, Sampling(max_new_tokens=6))
    assert [row["prediction"] for row in rows[2:]] == expected


@pytest.mark.slow
def test_final_holds_the_adapter_with_the_best_named_metric(make_config, tmp_path):
    """greater_is_better: true on the loss picks the worst adapter: final/ is that checkpoint, not the last one."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    result = train_ok(make_config(max_steps=3, eval_steps=1, save_steps=1, val_set_size=8,
                                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True))
    evals = logged(out, "eval_loss")
    worst = 1 + max(range(len(evals)), key=evals.__getitem__)
    summary = json.loads((out / "final" / "train_summary.json").read_text())["early_stopping"]
    assert summary["best_step"] == worst and summary["metric_for_best_model"] == "eval_loss"
    assert f"final: the best adapter, step {worst} (eval_loss" in result.stdout
    final = load_file(out / "final" / "adapter_model.safetensors")
    best = load_file(out / "checkpoints" / f"step-{worst}" / "adapter_model.safetensors")
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)
    assert worst != 3  # the loss falls at this learning rate, so the last adapter is not the one kept


@pytest.mark.slow
def test_router_aux_loss_is_added_to_the_training_loss_of_a_moe_model(make_config, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from test_axolotl_moe import build_tiny_moe

    base = build_tiny_moe("qwen3_moe", tmp_path / "moe", tiny_model_dir)
    settings = dict(base_model=str(base), lora_target_linear=None, lora_target_modules=["q_proj", "v_proj"],
                    max_steps=1)
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    train_ok(make_config("plain.yml", output_dir=str(plain), **settings))
    train_ok(make_config("weighted.yml", output_dir=str(weighted), router_aux_loss_coef=5.0, **settings))
    # the same token loss at step 1 (same start), the router loss logged beside it, and a different update
    assert logged(weighted)[0] == pytest.approx(logged(plain)[0], rel=1e-5)
    assert all(value > 0 for value in logged(weighted, "aux_loss")) and not logged(plain, "aux_loss")
    one = load_file(plain / "final" / "adapter_model.safetensors")
    other = load_file(weighted / "final" / "adapter_model.safetensors")
    assert any(not (one[k] - other[k]).abs().max() < 1e-6 for k in one)
