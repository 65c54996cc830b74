"""The reference log-probs a ZeRO-3 checkpoint carries: read back bit for bit by a resumed run, and a checkpoint
without them refused by name (the slow end-to-end run is in test_preference_train)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train.checkpoint import REFERENCE_LOGPS
from axlora.train.data_setup import TrainingData
from axlora.train.preference_setup import (
    attach_deferred_reference,
    loads_adapter_after_reference,
    reference_tensors,
)
from axlora.train.preference_step import PreferenceObjective
from axlora.train.resume import Resume


def _setup(tmp_path):
    path = tmp_path / "dpo.yml"
    path.write_text(yaml.safe_dump({"base_model": "axlora:tiny-llama", "lora_target_linear": True, "max_steps": 2,
                                    "rl": "dpo", "datasets": [{"path": "prefs.jsonl", "type": "chatml.intel"}]}))
    config = load_config(path)
    objective = PreferenceObjective(config, deferred_reference="adapter", reference_checkpointed=True)
    checkpoint = tmp_path / "checkpoints" / "step-2"
    checkpoint.mkdir(parents=True)
    resume = Resume(checkpoint, {"step": 2}, None)  # type: ignore[arg-type]
    said: list[str] = []
    return config, objective, resume, SimpleNamespace(say=said.append), said


def _rows(values: torch.Tensor) -> list[dict]:
    return [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_logps": row} for row in values.tolist()]


def test_a_resumed_zero3_run_reads_the_reference_its_checkpoint_saved(tmp_path):
    config, objective, resume, runtime, said = _setup(tmp_path)
    computed = TrainingData(None, None, _rows(torch.randn(5, 2) * 30), None, _rows(torch.randn(2, 2)), None)
    save_file(reference_tensors(computed), str(resume.checkpoint / REFERENCE_LOGPS))
    resumed = TrainingData(None, None, [{**row, "ref_logps": None} for row in computed.train_rows], None,
                           [{**row, "ref_logps": None} for row in computed.val_rows], None)
    assert not loads_adapter_after_reference(objective)  # the engine starts with the checkpoint's adapter
    attach_deferred_reference(config, objective, None, resumed, runtime, resume)
    assert resumed.train_rows == computed.train_rows and resumed.val_rows == computed.val_rows  # bit for bit
    assert objective.deferred_reference is None
    assert "log-probs of 7 rows read from checkpoints/step-2" in said[-1]


def test_a_zero3_checkpoint_without_the_reference_is_refused_by_name(tmp_path):
    config, objective, resume, runtime, _ = _setup(tmp_path)
    data = TrainingData(None, None, _rows(torch.zeros(3, 2)), None, [], None)
    with pytest.raises(UserError, match=f"step-2 holds no reference log-probs .* 3 train rows .*{REFERENCE_LOGPS}"):
        attach_deferred_reference(config, objective, None, data, runtime, resume)
