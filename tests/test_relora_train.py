"""ReLoRA end to end on a 4-bit base: the restarts merge, final/ merges to the trained model, a resume replays."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """bitsandbytes quantizes in blocks of 64 inputs: the 32-wide test model is too narrow for its CPU kernels."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny64", hidden_size=64, num_layers=2)


def _train(config_path, lines):
    """Train in this process and hand back the run, whose model is the trained one."""
    from axlora.config.load import load_config
    from axlora.train.recipe import TrainingRun
    from axlora.train.stop_requests import StopRequests

    config = load_config(config_path, log=lines.append)
    with StopRequests(lines.append) as stop:
        run = TrainingRun(config, lines.append, stop)
        run.setup()
        first = _dense_q_proj(run.unwrapped)
        run.train()
        run.finish()
    return run, first


def _dense_q_proj(model):
    import bitsandbytes.functional as bnb_f

    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float().clone()


def _logits(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.slow
def test_relora_on_4bit_merges_at_each_restart_and_final_merges_to_the_trained_model(make_config, tiny_64, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from axlora.merge_command import run_merge
    from axlora.model.load import load_base_model
    from axlora.train.relora import read_merges

    settings = {"base_model": str(tiny_64), "adapter": "qlora", "max_steps": 5, "relora_steps": 2,
                "relora_warmup_steps": 1, "save_steps": 2, "optimizer": "adamw_torch"}
    lines: list[str] = []
    run, first = _train(make_config(**settings), lines)
    out = tmp_path / "out"
    said = "\n".join(lines)
    assert "relora: restart 1 after step 2" in said and "relora: restart 2 after step 4" in said
    assert not torch.allclose(_dense_q_proj(run.unwrapped), first)  # the base took the merges
    # a restart happens before the checkpoint of its step: that checkpoint holds the fresh LoRA (B zero)
    at_restart = load_file(out / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert all(torch.count_nonzero(t) == 0 for name, t in at_restart.items() if "lora_B" in name)
    assert [m.step for m in read_merges(out / "checkpoints" / "step-4", 2)] == [2, 4]
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4 * 3

    ids = torch.arange(3, 40).reshape(1, -1)
    trained = _logits(run.unwrapped, ids)
    run_merge(run.config, lora_model_dir=None, output=None, dtype=None, verify=True, log=lines.append)
    from_merge = _logits(AutoModelForCausalLM.from_pretrained(out / "merged"), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_64), ids)
    quantized = _logits(load_base_model(run.config, torch.float32, log=lines.append), ids)
    # the run's forward is on 4-bit weights, the merged model's on full ones: they differ by about the rounding of
    # the base to 4 bits; without the merged restarts final/ would miss what the first 4 steps learned
    assert (from_merge - trained).abs().max() < 2.5 * (quantized - base).abs().max() < (from_merge - base).abs().max()

    # a resume from the checkpoint after the first restart replays its merge and ends where this run ended
    shutil.copytree(out / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    resumed, _ = _train(make_config("resume.yml", output_dir=str(tmp_path / "resumed"),
                                    resume_from_checkpoint="auto", **settings), lines)
    assert "relora: replayed the checkpoint's 1 merge(s) into the base weights" in "\n".join(lines)
    assert torch.equal(_dense_q_proj(resumed.unwrapped), _dense_q_proj(run.unwrapped))
    ours = load_file(out / "final" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
