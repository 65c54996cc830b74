"""Expert parallelism: the experts split over two gloo processes compute what the whole experts compute.

The dispatch/combine test runs this file as a 2-process gloo group (``torch.distributed.run``); each process
checks its own tokens' outputs and input gradients against the unsharded experts module of transformers 5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from axlora.config.load import load_config
from axlora.core.errors import ConfigError, UserError
from axlora.train.expert_parallel_setup import place_experts, start_expert_groups

from conftest import assert_close_final_adapters, logged, main_in_process, train_ok

EXPERTS, HIDDEN, TOKENS, TOP_K = 4, 16, 12, 2
ROUTINGS = ("spread", "first_half_only")  # the second leaves process 1 with nothing to compute


def test_dispatch_and_combine_match_the_whole_experts_over_gloo(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               str(tmp_path)]
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert figures["local_experts"] == EXPERTS // 2
        for case, differences in figures["cases"].items():
            assert differences["output"] < 1e-5, (rank, case, differences)
            assert differences["input_grad"] < 1e-5, (rank, case, differences)
            assert differences["weight_grad"] < 1e-5, (rank, case, differences)
            assert differences["output_norm"] > 0.1, (rank, case)  # the comparison is not between zeros


def test_refused_combinations_name_the_keys(make_config, capsys):
    for keys, message in (
        ({"num_processes": 3}, "expert_parallel_size / num_processes: 2 does not divide the 3 process(es)"),
        ({"num_processes": 2, "deepspeed": "zero2"}, "expert_parallel_size / deepspeed"),
        ({"num_processes": 2, "fsdp_config": {}}, "expert_parallel_size / fsdp"),
        ({"lora_target_parameters": ["mlp.experts.down_proj"]}, "expert_parallel_size / lora_target_parameters"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(make_config(expert_parallel_size=2, **keys), log=lambda _n: None)
    # one process cannot split anything: refused with exit status 2 before a model loads
    result = main_in_process(capsys, "train", str(make_config(expert_parallel_size=2, num_processes=1)))
    assert result.returncode == 2 and "expert_parallel_size / num_processes: 2 does not divide the 1" in result.stderr
    # num_processes left to the machine: the run checks the process count it got
    unset = load_config(make_config(expert_parallel_size=2), log=lambda _n: None)
    with pytest.raises(UserError, match="expert_parallel_size: 2 does not divide the 1 process"):
        start_expert_groups(unset, world_size=1, rank=0)


def test_axolotl_plugin_reads_as_expert_parallel_size(make_config):
    config = load_config(make_config(plugins=["axolotl.integrations.expert_parallel.ExpertParallelPlugin"],
                                      expert_parallel_size=2, num_processes=2), log=lambda _n: None)
    assert config.expert_parallel_size == 2


def test_models_it_cannot_split_are_refused(make_config, tmp_path, tiny_model_dir):
    """Checked on the model before anything is exchanged: a dense model, and LoRA on the experts (a continued
    adapter's own targets are not in the YAML, so the config check alone would miss them)."""
    import torch
    from test_axolotl_moe import EXPERTS as EXPERT_PARAMETERS
    from test_axolotl_moe import build_tiny_moe

    from axlora.model.adapter import attach_adapter
    from axlora.model.adapter_choice import resolve_adapter
    from axlora.model.expert_parallel import ExpertGroup
    from axlora.model.load import load_base_model

    group = ExpertGroup(group=None, rank=0, size=2)
    base = build_tiny_moe("qwen3_moe", tmp_path / "qwen3_moe", tiny_model_dir)
    cases = ((tiny_model_dir, {}, "has no fused MoE experts"),
             (base, {"lora_target_parameters": EXPERT_PARAMETERS}, "the experts are trained here"))
    for model_dir, keys, message in cases:
        config = load_config(make_config(base_model=str(model_dir), lora_target_linear=None,
                                         lora_target_modules=["q_proj"], **keys), log=lambda _n: None)
        model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                               resolve_adapter(config), log=lambda _m: None)
        with pytest.raises(UserError, match=message):
            place_experts(model, group, say=lambda _m: None)


@pytest.mark.slow
def test_two_processes_with_experts_split_train_as_without(make_config, tmp_path, tiny_model_dir):
    """Two processes with the experts split between them train what one process without expert parallelism trains
    on the same rows (micro batch 2 x 2 processes = 4 x 1): the same losses, eval loss and adapter. Gradient
    checkpointing re-runs the exchanges in backward; evaluation and sample completions run on both processes."""
    from test_axolotl_moe import build_tiny_moe

    base = build_tiny_moe("qwen3_moe", tmp_path / "qwen3_moe", tiny_model_dir)
    common = {"base_model": str(base), "lora_target_linear": None, "lora_target_modules": ["q_proj", "o_proj"],
              "max_steps": 2, "gradient_checkpointing": True, "eval_steps": 2, "val_set_size": 4,
              "sample_prompts": ["1+1="], "sample_max_new_tokens": 3}
    train_ok(make_config("one.yml", output_dir=str(tmp_path / "one"), micro_batch_size=4, num_processes=1, **common))
    result = train_ok(make_config("ep.yml", output_dir=str(tmp_path / "ep"), micro_batch_size=2, num_processes=2,
                                  expert_parallel_size=2, **common))
    assert "2 MoE layers, 4 experts each over 2 processes: each keeps 2" in result.stdout
    assert logged(tmp_path / "ep") == pytest.approx(logged(tmp_path / "one"), abs=1e-5)
    assert logged(tmp_path / "ep", "eval_loss") == pytest.approx(logged(tmp_path / "one", "eval_loss"), abs=1e-5)
    assert_close_final_adapters(tmp_path / "ep", tmp_path / "one", rtol=0, atol=1e-5)


def _experts(implementation: str):
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=8, num_experts=EXPERTS,
                            num_experts_per_tok=TOP_K)
    config._experts_implementation = implementation
    torch.manual_seed(0)  # the same weights on both processes
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(std=0.5)
    return experts


def _routing(case: str, rank: int):
    """This process's tokens, their experts and routing weights (different on each process)."""
    import torch

    generator = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator)
    scores = torch.rand(TOKENS, EXPERTS, generator=generator)
    if case == "first_half_only":
        scores[:, EXPERTS // 2:] = -1  # every token picks experts held by process 0
    weights, index = torch.topk(scores.softmax(dim=-1), TOP_K, dim=-1)
    return hidden, index, weights / weights.sum(dim=-1, keepdim=True)


def _run(experts, case: str, rank: int):
    import torch

    hidden, index, weights = _routing(case, rank)
    hidden.requires_grad_(True)
    weights.requires_grad_(True)
    output = experts(hidden, index, weights)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(7 + rank))
    (output * upstream).sum().backward()
    return output.detach(), hidden.grad, weights.grad


def _worker(out: Path) -> None:
    """One process: each case through the whole experts, then through the split ones; the differences."""
    import copy

    import torch.distributed as dist
    from torch import nn

    from axlora.model.expert_parallel import ExpertGroup, shard_experts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = ExpertGroup(group=dist.new_group([0, 1]), rank=rank, size=2)
    cases = {}
    for implementation in ("eager", "grouped_mm"):
        whole = _experts(implementation)
        layer = nn.Module()
        layer.experts = copy.deepcopy(whole)
        sliced = shard_experts(layer, group)
        for case in ROUTINGS:
            expected, got = _run(whole, case, rank), _run(layer.experts, case, rank)
            cases[f"{implementation}/{case}"] = {
                name: float((mine - theirs).abs().max())
                for name, mine, theirs in zip(("output", "input_grad", "weight_grad"), got, expected, strict=True)
            } | {"output_norm": float(expected[0].norm())}
    figures = {"local_experts": layer.experts.local.num_experts, "sliced": [list(p.shape) for p in sliced],
               "cases": cases}
    (out / f"rank-{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
