"""FSDP-QLoRA on quantized MoE experts (``quantize_moe_experts`` with ``fsdp``): the packed expert bytes are stored as
a flat parameter of the compute dtype, which ``fully_shard`` shards over gloo like any weight, and the experts are
read from the gathered bytes on every forward, with peft's expert LoRA on top.

The two-process run is launched with torch's own launcher on this file (the worker at the bottom): it loads the tiny
Qwen3-MoE through axlora's loading, adapter and sharding code, trains a few steps and reports its losses and what
each rank stores. On a machine without CUDA ``axlora train`` stops an FSDP run on a 4-bit base before loading
(``model.machine``), so the worker drives the same functions the recipe calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_axolotl_moe import moe_64  # noqa: F401  (the fixture: a tiny Qwen3-MoE 64 wide, bitsandbytes' block)

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROWS, LENGTH, STEPS = 4, 16, 3
# what loading does under fsdp (model.load.bitsandbytes_config): the 4-bit linear layers' bytes in the compute dtype
SHARDED_STORAGE = {"bnb_config_kwargs": {"bnb_4bit_quant_storage": "float32"}}


def _config(model_dir, **keys):
    from axlora.config.schema import Config

    return Config(base_model=str(model_dir), datasets=[{"path": "d.jsonl", "type": "alpaca"}], adapter="qlora",
                  quantize_moe_experts=True, lora_r=4, lora_alpha=8, lora_dropout=0, lora_target_modules=["q_proj"],
                  lora_target_parameters=EXPERTS, max_steps=STEPS, **keys)


def _model(model_dir, dtype=torch.float32, **keys):
    """The QLoRA model with NF4 experts and LoRA on them, as the recipe builds it."""
    from axlora.model.adapter import attach_adapter
    from axlora.model.adapter_choice import resolve_adapter
    from axlora.model.load import load_base_model

    config = _config(model_dir, **keys)
    torch.manual_seed(0)
    return attach_adapter(load_base_model(config, dtype, log=lambda _m: None), config, resolve_adapter(config),
                          log=lambda _m: None)


def _batch(rank: int = 0, world: int = 1) -> torch.Tensor:
    return (torch.arange(ROWS * LENGTH).reshape(ROWS, LENGTH) * 7 % 120 + 1).chunk(world)[rank]


def _train_steps(model, ids, average=lambda tensor: tensor) -> list[float]:
    """STEPS AdamW steps on ``ids``; ``average`` makes a tensor the mean over the processes (each holds as many label
    tokens, so the mean of their mean losses is the loss of the whole batch)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for parameter in trainable:
            parameter.grad = average(parameter.grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(average(loss.detach()).item())
    return losses


def _stack_figures(model) -> dict:
    """Per expert stack: the bytes this rank stores for it, against the same stack in bf16."""
    from torch.distributed.tensor import DTensor

    from axlora.model.expert_quant import FlatBytes, PackedExperts

    figures = {}
    for name, stack in model.named_parameters():
        if not isinstance(stack, PackedExperts):
            continue
        figures[name] = {"stored_bytes": stack.packed_bytes(), "bf16_bytes": stack.numel() * 2, "sharded": False}
        if isinstance(stack.source, FlatBytes):
            storage = model.get_parameter(f"{name}_packed")
            local = storage.to_local() if isinstance(storage, DTensor) else storage
            figures[name].update(stored_bytes=local.numel() * local.element_size(), dtype=str(local.dtype),
                                 sharded=isinstance(storage, DTensor), storage_shape=list(storage.shape),
                                 frozen=not storage.requires_grad)
    return figures


def test_flat_storage_reads_the_same_experts_and_trains_their_lora(moe_64):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    from axlora.model.expert_quant import FlatBytes, PackedExperts, store_experts_flat

    model = _model(moe_64, torch.bfloat16)
    ids = _batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    stacks = store_experts_flat(model, torch.device("cpu"))
    assert len(stacks) == 2 * 2 and all(isinstance(s, PackedExperts) and isinstance(s.source, FlatBytes)
                                        for s in stacks)
    storage = {n: p for n, p in model.named_parameters() if n.endswith("_packed")}
    assert len(storage) == 4
    for name, flat in storage.items():  # a flat frozen tensor of the compute dtype, a quarter of the bf16 stack
        stack = model.get_parameter(name.removesuffix("_packed"))
        assert flat.dim() == 1 and flat.dtype == torch.bfloat16 and not flat.requires_grad
        assert flat.numel() * flat.element_size() * 4 <= stack.numel() * 2
    kept = {n: p.detach().clone() for n, p in storage.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    losses = _train_steps(model, ids)
    assert losses[-1] < losses[0], losses
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n)
    assert all(torch.equal(storage[n].view(torch.uint8), kept[n].view(torch.uint8)) for n in kept)  # frozen bytes


def test_quantize_moe_experts_with_fsdp_validates_and_every_process_quantizes_its_experts():
    from axlora.config.fsdp import fsdp_settings

    config = _config("m", fsdp=["full_shard", "auto_wrap"], fsdp_config={"fsdp_version": 2})
    assert config.quantize_moe_experts and config.uses_fsdp()
    # rank 0 alone would read the weights: with quantized experts each process loads (and quantizes) its own
    assert not fsdp_settings(_config("m", fsdp_config={"cpu_ram_efficient_loading": True})).load_on_main_only


@pytest.mark.slow
def test_two_processes_shard_the_nf4_experts_and_train_as_one(moe_64, tmp_path):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    alone = _model(moe_64, **SHARDED_STORAGE)
    reference = _train_steps(alone, _batch())
    alone.save_pretrained(tmp_path / "alone")

    run = _launch(moe_64, tmp_path / "fsdp", processes=2)
    assert run["losses"] == pytest.approx(reference, rel=1e-4)
    assert len(run["stacks"]) == 4
    for figures in run["stacks"].values():  # rank 0 holds half of each stack's NF4 bytes, in a flat float32 shard
        assert figures["sharded"] and figures["frozen"] and figures["dtype"] == "torch.float32"
        assert len(figures["storage_shape"]) == 1
        assert 2 * figures["stored_bytes"] * 4 <= figures["bf16_bytes"]

    sharded = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    same = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    assert sharded.keys() == same.keys() and any(".experts." in name for name in sharded)
    for name, tensor in same.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-3, atol=1e-5)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_64), str(tmp_path / "fsdp" / "adapter"))
    expert_b = [p for n, p in plain.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(expert_b) == 4 and all(p.abs().sum() > 0 for p in expert_b)  # lora_B starts at 0: it trained


def _launch(model_dir: Path, out: Path, processes: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, str(model_dir), str(out)]
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / "run.json").read_text())


def _sharded_worker(model_dir: str, out: Path) -> None:
    """One process of the FSDP run: shard the model as the recipe does, train on this rank's rows, and on rank 0
    write the losses, the stacks' figures and the adapter."""
    import torch.distributed as dist

    from axlora.config.fsdp import FsdpSettings
    from axlora.train.fsdp import shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(model_dir, **SHARDED_STORAGE)
    shard_model(model, FsdpSettings(reshard_after_forward=True, offload_params=False, layer_classes=None),
                torch.device("cpu"))

    def average(tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / world

    losses = _train_steps(model, _batch(rank, world), average)
    if rank == 0:
        model.save_pretrained(out / "adapter")
        (out / "run.json").write_text(json.dumps({"losses": losses, "stacks": _stack_figures(model)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _sharded_worker(sys.argv[1], Path(sys.argv[2]))
