"""Continuing a LoRA through the real CLI: a plain-peft adapter, an earlier axlora run, a foreign base.

Each case checks an outcome that is wrong if the loader is: the adapter trains (its weights move away from
the source, but start from it), its own rank/alpha/targets win with every differing YAML key named, the
source directory is byte-identical afterwards, and an adapter of another base model is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import main_in_process, run_cli

pytestmark = pytest.mark.slow

WEIGHTS = "adapter_model.safetensors"


def write_config(directory: Path, tiny_model_dir: Path, alpaca_file: Path, **overrides) -> Path:
    """A tiny-model config (as conftest's ``make_config``) usable from module-scoped fixtures."""
    data = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
        "sequence_len": 96, "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1,
        "output_dir": str(directory / "out"),
    }
    data.update(overrides)
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: equal digests mean a byte-identical tree."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """An adapter saved by plain peft (r=8, alpha=16, q/v, dropout 0.1) with random, non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    target = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def continued(tmp_path_factory, tiny_model_dir, alpaca_file, peft_adapter):
    """Continue the peft adapter with a YAML that says other adapter settings (r 4, alpha 8, all linear)."""
    before = tree_digest(peft_adapter)
    work = tmp_path_factory.mktemp("continue")
    config = write_config(work, tiny_model_dir, alpaca_file, lora_model_dir=str(peft_adapter), lora_r=4,
                          lora_alpha=8, lora_dropout=0.0, lora_target_linear=True)
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(out=work / "out", result=result, source_before=before)


def test_continued_adapter_trains_from_the_source_weights(continued, peft_adapter):
    source = load_file(peft_adapter / WEIGHTS)
    final = load_file(continued.out / "final" / WEIGHTS)
    assert final.keys() == source.keys()
    for key, start in source.items():
        assert not torch.equal(final[key], start), f"{key} did not train (loaded frozen?)"
        # a few steps at lr 1e-2 move each weight a little; a fresh LoRA (lora_B = 0) would be far away
        assert (final[key] - start).abs().max() < 0.2, f"{key} did not start from the source adapter"
    assert "trainable" in continued.result.stdout


def test_the_adapters_own_settings_win_and_each_difference_is_named(continued):
    saved = json.loads((continued.out / "final" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["lora_dropout"] == 0.1
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    out = continued.result.stdout
    assert "warning: lora_r: YAML says 4, the adapter has 8" in out
    assert "warning: lora_alpha: YAML says 8, the adapter has 16" in out
    assert "warning: lora_dropout: YAML says 0, the adapter has 0.1" in out
    assert "warning: lora_target_linear: YAML says True" in out and "the adapter adapts ['q_proj', 'v_proj']" in out
    resolved = yaml.safe_load((continued.out / "final" / "axlora.yml").read_text())
    assert (resolved["lora_r"], resolved["lora_alpha"]) == (8, 16)  # final/axlora.yml tells what was trained
    assert resolved["lora_target_modules"] == ["q_proj", "v_proj"] and resolved["lora_target_linear"] is False


def test_source_directory_is_byte_identical_and_output_goes_to_the_new_dir(continued, peft_adapter):
    assert tree_digest(peft_adapter) == continued.source_before
    summary = json.loads((continued.out / "final" / "train_summary.json").read_text())
    assert summary["adapter"]["case"] == "continue"
    assert summary["adapter"]["continued_from"] == str(peft_adapter)


def test_strict_turns_the_differences_into_exit_2(tmp_path, tiny_model_dir, alpaca_file, peft_adapter):
    config = write_config(tmp_path, tiny_model_dir, alpaca_file, lora_model_dir=str(peft_adapter), lora_r=4,
                          strict=True)
    result = run_cli("train", str(config))  # one refusal through a real process: exit status 2 end to end
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "strict:" in result.stderr and "lora_r: YAML says 4, the adapter has 8" in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_round_two_finds_the_earlier_runs_final_adapter(tmp_path, tiny_model_dir, continued):
    """Round 2 names only the earlier output_dir, a new dataset and a lower lr; eval_on_start is its baseline."""
    from axlora.data.demo_rows import addition_rows, write_jsonl

    second = tmp_path / "second.jsonl"
    write_jsonl(addition_rows(40, seed=11), second)
    round_one = tree_digest(continued.out / "final")
    config = write_config(tmp_path, tiny_model_dir, second, lora_model_dir=str(continued.out),
                          learning_rate=1e-3, val_set_size=8, eval_on_start=True, max_steps=2)
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{continued.out} is an earlier axlora run; continuing its final/ adapter" in result.stdout
    assert "warning:" not in result.stdout  # the YAML names no adapter settings: nothing to contradict
    rows = [json.loads(line) for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0].keys() == {"step", "eval_loss"}  # the baseline, before any step
    assert rows[-1]["step"] == 2
    assert tree_digest(continued.out / "final") == round_one
    saved = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert saved["r"] == 8


def test_run_dir_without_final_uses_its_newest_complete_checkpoint(tmp_path, continued):
    run = tmp_path / "earlier"
    for step in (2, 4):
        shutil.copytree(continued.out / "final", run / "checkpoints" / f"step-{step}")
        (run / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    shutil.copytree(run / "checkpoints" / "step-4", run / "checkpoints" / ".step-6.tmp-123")  # a killed save
    config = tmp_path / "c.yml"
    config.write_text((continued.out / "final" / "axlora.yml").read_text())
    result = run_cli("validate", str(config), "--lora_model_dir", str(run), "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "continuing its newest complete checkpoint checkpoints/step-4" in result.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "bad-json"])
def test_unusable_lora_model_dir_exits_2_naming_it(tmp_path, tiny_model_dir, alpaca_file, case, capsys):
    target = tmp_path / "adapter"
    expected = {"missing": "does not exist; expected a PEFT adapter directory",
                "empty": "no adapter in", "bad-json": "cannot read"}[case]
    if case != "missing":
        target.mkdir()
    if case == "bad-json":
        (target / "adapter_config.json").write_text("{not json")
        (target / WEIGHTS).write_bytes(b"")
    config = write_config(tmp_path, tiny_model_dir, alpaca_file, lora_model_dir=str(target))
    result = main_in_process(capsys, "train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(target) in result.stderr and expected in result.stderr


@pytest.fixture(scope="module")
def other_shape_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A Llama with hidden size 48 (the tiny one has 32) and the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    settings = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    settings.update(hidden_size=48, intermediate_size=96)
    settings.pop("head_dim", None)
    target = tmp_path_factory.mktemp("models") / "wider"
    AutoModelForCausalLM.from_config(LlamaConfig(**settings)).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, target / name)
    return target


def test_adapter_of_a_different_base_is_refused_naming_both(tmp_path, tiny_model_dir, alpaca_file, peft_adapter,
                                                            other_shape_model, capsys):
    config = write_config(tmp_path, other_shape_model, alpaca_file, lora_model_dir=str(peft_adapter),
                          allow_base_mismatch=True)  # the opt-in cannot make wrong shapes fit
    result = main_in_process(capsys, "train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"trained on base model '{tiny_model_dir}'" in result.stderr
    assert f"does not fit base_model '{other_shape_model}'" in result.stderr
    assert "model.layers.0.self_attn.q_proj: the adapter needs a [32, 32] weight, base_model has [48, 48]" \
        in result.stderr


def test_loaded_base_is_checked_when_its_files_could_not_tell(tmp_path, peft_adapter, other_shape_model,
                                                              alpaca_file):
    """A Hub or built-in base is only known once loaded: the same refusal then comes from attach_adapter."""
    from transformers import AutoModelForCausalLM

    from axlora.config.load import load_config
    from axlora.core.errors import UserError
    from axlora.model.adapter import attach_adapter
    from axlora.model.adapter_choice import AdapterChoice, read_lora_config

    config = load_config(write_config(tmp_path, other_shape_model, alpaca_file, lora_target_linear=True))
    plan = AdapterChoice("continue", "test", peft_adapter, read_lora_config(peft_adapter))
    model = AutoModelForCausalLM.from_pretrained(other_shape_model)
    with pytest.raises(UserError, match=r"q_proj: the adapter needs a \[32, 32\] weight, base_model has \[48, 48\]"):
        attach_adapter(model, config, plan, log=lambda *_: None)


def test_same_shapes_under_another_name_need_the_opt_in(tmp_path, tiny_model_dir, alpaca_file, peft_adapter,
                                                        capsys):
    copy = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_dir, copy)
    config = write_config(tmp_path, copy, alpaca_file, lora_model_dir=str(peft_adapter), max_steps=1)
    refused = main_in_process(capsys, "train", str(config))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"trained on base model '{tiny_model_dir}', but base_model is '{copy}'" in refused.stderr
    assert "allow_base_mismatch: true" in refused.stderr
    allowed = run_cli("train", str(config), "--allow_base_mismatch", "true")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "warning: allow_base_mismatch" in allowed.stdout
    assert (tmp_path / "out" / "final" / WEIGHTS).is_file()


def test_continuing_into_the_adapters_own_output_dir_is_refused(tmp_path, tiny_model_dir, alpaca_file, continued):
    config = write_config(tmp_path, tiny_model_dir, alpaca_file, lora_model_dir=str(continued.out),
                          output_dir=str(continued.out))
    result = run_cli("validate", str(config))
    assert result.returncode == 2 and "set a new output_dir" in result.stderr


def _damage(weights: Path, case: str) -> str:
    """Damage an adapter's weights file as a crash, a bad disk or a diverged run would; returns the expected words."""
    import struct

    from safetensors.torch import save_file

    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    if case == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        return "the file is truncated"
    if case == "truncated-header":
        weights.write_bytes(data[: 8 + header_len // 2])
        return "the file ends inside its"
    if case == "empty":
        weights.write_bytes(b"")
        return "file shorter than 8 bytes"
    if case == "damaged-entry":
        header = json.loads(data[8: 8 + header_len])
        name = next(key for key in header if key != "__metadata__")
        header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]
        raw = json.dumps(header).encode().ljust(header_len)
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len:])
        return f"tensor '{name}' has a damaged header entry"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return f"tensor {name} holds NaN/inf"


@pytest.mark.parametrize("case", ["truncated", "truncated-header", "empty", "damaged-entry", "nan"])
def test_damaged_adapter_exits_2_naming_the_file(tmp_path, tiny_model_dir, alpaca_file, peft_adapter, case, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(peft_adapter, adapter)
    expected = _damage(adapter / WEIGHTS, case)
    config = write_config(tmp_path, tiny_model_dir, alpaca_file, lora_model_dir=str(adapter), max_steps=1)
    result = main_in_process(capsys, "train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"lora_model_dir: {adapter / WEIGHTS}: " in result.stderr and expected in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_target_module_matching_nothing_is_named(tmp_path, tiny_model_dir, alpaca_file, capsys):
    """peft would adapt q_proj alone and drop the misspelt entries without a word."""
    config = write_config(tmp_path, tiny_model_dir, alpaca_file, lora_target_modules=["q_proj", "v_prj", "mlp.up"])
    result = main_in_process(capsys, "train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lora_target_modules: 'v_prj' (did you mean 'v_proj'?), 'mlp.up'" in result.stderr
    assert "name no module of base_model" in result.stderr and "'q_proj'" not in result.stderr
    assert "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_hidden_final_left_by_a_kill_is_restored_and_used(tmp_path, tiny_model_dir, alpaca_file, peft_adapter,
                                                          capsys):
    """A kill between the two renames that replace final/ (filesystems without RENAME_EXCHANGE) hides it."""
    from axlora.config.load import load_config
    from axlora.merge_command import choose_adapter

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(peft_adapter, run / ".final.old-999999999")  # a dead process's complete hidden copy
    config = load_config(write_config(tmp_path, tiny_model_dir, alpaca_file, output_dir=str(run),
                                      lora_target_linear=True))
    logs: list[str] = []
    adapter, reason = choose_adapter(config, None, logs.append)
    assert adapter == run / "final" and "the run's final adapter" in reason
    assert tree_digest(run / "final") == tree_digest(peft_adapter)
    assert len(logs) == 1 and "restored the complete copy .final.old-999999999" in logs[0]

    (run / "final").rename(run / ".final.old-999999999")  # and once more, found through lora_model_dir
    result = run_cli("validate", str(write_config(tmp_path, tiny_model_dir, alpaca_file, lora_model_dir=str(run))))
    assert result.returncode == 0, result.stderr
    assert "is an earlier axlora run; continuing its final/ adapter" in result.stdout
    assert "restored the complete copy" in result.stderr and (run / "final").is_dir()
