"""ReLoRA: the jagged schedule, one merge and reset (plain, 4-bit, 8-bit), optimizer pruning, the adapter final/
saves, and the config keys (both of Axolotl's spellings)."""

from __future__ import annotations

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train.relora_schedule import jagged_factor


def test_jagged_factor_matches_hand_computed_values():
    # N = 10 restart steps, W = 3 warm-up, A = 4 anneal, lowest factor 0.001: scale = 0.001 + 0.999 * t
    expected = {0: 1.0, 6: 1.0,  # the first cycle has no warm-up; its anneal starts at p > N - A = 6
                7: 0.001 + 0.999 * 3 / 4, 8: 0.001 + 0.999 * 2 / 4, 9: 0.001 + 0.999 * 1 / 4,
                10: 0.001, 11: 0.001 + 0.999 / 3, 12: 0.001 + 0.999 * 2 / 3, 13: 1.0, 16: 1.0,
                17: 0.001 + 0.999 * 3 / 4, 20: 0.001}
    for step, factor in expected.items():
        assert jagged_factor(step, 10, 3, 4, 0.001) == pytest.approx(factor), step
    # Axolotl's default anneal of 1 step never anneals; its restart warm-up starts from the floor
    assert [jagged_factor(s, 4, 2, 1, 0.1) for s in range(9)] == pytest.approx(
        [1.0, 1.0, 1.0, 1.0, 0.1, 0.55, 1.0, 1.0, 0.1])


def test_restarted_schedule_is_the_schedule_times_the_factor_and_resumes(make_config):
    from axlora.train.optim import build_lr_scheduler
    from axlora.train.relora_schedule import with_jagged_restarts

    config = load_config(make_config(lr_scheduler="cosine", warmup_steps=2, learning_rate=0.1, relora_steps=4,
                                     relora_warmup_steps=2), log=lambda _n: None)

    def schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, with_jagged_restarts(build_lr_scheduler(optimizer, config, 12), optimizer, config)

    optimizer, restarted = schedule()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    plain = build_lr_scheduler(other, config, 12)
    rates = []
    for step in range(12):
        assert restarted.get_last_lr()[0] == pytest.approx(plain.get_last_lr()[0] * jagged_factor(step, 4, 2, 1))
        rates.append(restarted.get_last_lr()[0])
        optimizer.step(), other.step()
        restarted.step(), plain.step()
    assert rates[4] == pytest.approx(plain.lr_lambdas[0](4) * 0.1 * 0.001)  # the step after the 4th: the floor
    _, again = schedule()
    again.load_state_dict(restarted.state_dict())
    assert again.get_last_lr() == restarted.get_last_lr()


def _lora_on(base, **lora):
    """A LoRA (r 4, alpha 8: scale 2) on ``proj`` with B drawn too, so it already changes the output."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], **lora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    return model


class _Holder(torch.nn.Module):
    """One 64 x 64 linear layer named ``proj``: plain, or bitsandbytes 4-bit or 8-bit."""

    def forward(self, x):
        return self.proj(x)


def _tiny_linear(kind: str):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64, bias=False)
    holder = _Holder()
    if kind == "plain":
        holder.proj = dense
        return holder, dense.weight.detach().clone()
    import bitsandbytes as bnb

    if kind == "4bit":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    holder.proj = layer.to("cpu")
    return holder, None


def _dense_weight(layer):
    import bitsandbytes.functional as bnb_f

    weight = layer.get_base_layer().weight
    if type(weight).__name__ == "Params4bit":
        return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(weight).__name__ == "Int8Params":
        scales = weight.SCB if weight.SCB is not None else layer.get_base_layer().state.SCB
        return weight.data.float() * scales.float().unsqueeze(1) / 127
    return weight.detach().float().clone()


@pytest.mark.parametrize("kind", ["plain", "4bit", "8bit"])
def test_a_merge_adds_scale_times_b_a_to_the_base_and_starts_a_fresh_lora(kind):
    if kind != "plain":
        pytest.importorskip("bitsandbytes")
    from axlora.train.relora_merge import current_factors, lora_layers, merge_into_base, reinitialise

    holder, _ = _tiny_linear(kind)
    model = _lora_on(holder)
    [(name, layer)] = lora_layers(model).items()
    before = _dense_weight(layer)
    lora_a, lora_b = (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
    expected = before + (lora_b @ lora_a) * 2.0  # alpha / r = 8 / 4
    factors = current_factors(layer, "default")
    merge_into_base(layer, factors)
    reinitialise(layer, "default", torch.Generator().manual_seed(1))
    after = _dense_weight(layer)
    # 4-bit rounds each weight to one of 16 levels of its block's largest magnitude; 8-bit to 1/127 of its row's
    tolerance = {"plain": 1e-6, "4bit": 0.2 * expected.abs().max().item(), "8bit": expected.abs().max().item() / 127}
    assert (after - expected).abs().max().item() <= tolerance[kind]
    assert (after - before).abs().max().item() > 10 * (tolerance[kind] if kind == "plain" else 0.01)
    assert (after - expected).abs().mean() < (after - before).abs().mean() / 4  # the update, not noise
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert not torch.equal(layer.lora_A["default"].weight.detach(), lora_a)
    if kind == "4bit":  # exactly what quantizing base + update gives
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(before + factors.delta("cpu"), quant_type="nf4", compress_statistics=True)
        assert torch.equal(after, bnb_f.dequantize_4bit(packed, state).float())
    probe = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(model(probe), probe @ after.T, atol=1e-2)  # the fresh LoRA adds nothing


def test_the_optimizer_state_of_the_lora_is_pruned_by_magnitude_and_at_random():
    from axlora.train.relora_optim import prune_optimizer_state

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 64))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    moment = optimizer.state[weight]["exp_avg"].clone()
    zeroed, total = prune_optimizer_state(optimizer, [weight], 0.9, "magnitude", torch.Generator().manual_seed(0))
    assert total == 2 * weight.numel() and zeroed == pytest.approx(0.9 * total, abs=4)
    kept = optimizer.state[weight]["exp_avg"] != 0
    assert torch.equal(optimizer.state[weight]["exp_avg"][kept], moment[kept])
    assert moment.abs()[kept].min() > moment.abs()[~kept].max()  # the largest survive
    prune_optimizer_state(optimizer, [weight], 0.5, "random", torch.Generator().manual_seed(0))
    zeros = sum(int((optimizer.state[weight][key] == 0).sum()) for key in ("exp_avg", "exp_avg_sq"))
    assert 0.93 * total < zeros < 0.97 * total  # zeroed values stay zero; about half of the rest joins them


def test_bitsandbytes_8bit_adam_state_is_pruned_through_its_code_map():
    bnb = pytest.importorskip("bitsandbytes")
    from axlora.train.relora_optim import _read, prune_optimizer_state

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8
    codes, values = state["state1"].clone(), _read(state, "state1", state["state1"])
    zeroed, total = prune_optimizer_state(optimizer, [weight], 0.9, "magnitude", torch.Generator())
    after = _read(state, "state1", state["state1"])
    kept = after != 0
    assert 0.85 < 1 - kept.float().mean().item() < 0.95
    assert torch.equal(state["state1"][kept], codes[kept]) and torch.equal(after[kept], values[kept])
    assert zeroed > 0.85 * total


def test_final_adapter_holds_every_merge_beside_the_last_lora(tmp_path):
    from peft import PeftModel

    from axlora.train.relora import ReLoRA, cumulative_adapter

    config = load_config_from(tmp_path, relora_steps=1, lora_target_modules=["proj"], lora_target_linear=False)
    holder, original = _tiny_linear("plain")
    model = _lora_on(holder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    relora = ReLoRA(config, model, say=lambda _m: None)
    probe = torch.randn(5, 64)
    for step in (1, 2):
        relora.restart(step, optimizer)
        torch.nn.init.normal_(model.base_model.model.proj.lora_B["default"].weight, std=0.5)
    with torch.no_grad():
        trained = model(probe)
        with cumulative_adapter(relora, model):
            model.save_pretrained(tmp_path / "final")
        assert torch.equal(model(probe), trained)  # the model's own LoRA is back
    fresh, _ = _tiny_linear("plain")
    assert torch.equal(fresh.proj.weight, original)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "final")
    assert loaded.peft_config["default"].r == 12 and loaded.peft_config["default"].lora_alpha == 24
    with torch.no_grad():
        assert torch.allclose(loaded(probe), trained, atol=1e-5)


def load_config_from(tmp_path, **keys):
    import yaml

    data = {"base_model": "axlora:tiny-llama", "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
            "lora_target_linear": True, "output_dir": str(tmp_path / "out"), **keys}
    path = tmp_path / "relora.yml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, log=lambda _n: None)


def test_axolotl_spellings_and_what_relora_is_refused_with(tmp_path):
    older = load_config_from(tmp_path, adapter="qlora", load_in_4bit=True, relora_steps=150, relora_warmup_steps=10,
                             relora_cpu_offload=False, optimizer="adamw_bnb_8bit")
    assert older.merges_lora() and older.restart_steps() == 150 and older.restart_warmup_steps() == 10
    assert older.restart_anneal_steps() == 1 and older.prune_ratio() == 0.9
    newer = load_config_from(tmp_path, relora=True, jagged_restart_steps=50, jagged_restart_anneal_steps=5,
                             relora_prune_method="reset")
    assert newer.merges_lora() and newer.restart_anneal_steps() == 5 and newer.prune_ratio() == 0.999
    jagged_only = load_config_from(tmp_path, jagged_restart_steps=50)
    assert not jagged_only.merges_lora() and jagged_only.restart_steps() == 50
    refusals = {
        "two spellings of one setting": {"relora_steps": 10, "jagged_restart_steps": 20},
        "relora: a ReLoRA restart happens every jagged_restart_steps": {"relora": True},
        "relora_prune_ratio: settings of ReLoRA's merges, which are off": {"jagged_restart_steps": 5,
                                                                           "relora_prune_ratio": 0.5},
        "relora / early_stopping_patience": {"relora_steps": 5, "early_stopping_patience": 2, "val_set_size": 0.1},
        "relora / optimizer: a restart prunes Adam's": {"relora_steps": 5, "optimizer": "sgd"},
        "relora / peft_use_dora": {"relora_steps": 5, "peft_use_dora": True},
        "one_cycle is not one of those": {"jagged_restart_steps": 5, "lr_scheduler": "one_cycle"},
    }
    for message, keys in refusals.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            load_config_from(tmp_path, **keys)
