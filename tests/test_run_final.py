"""``final/`` is replaced without a window (``core.atomic``); a train run that finds only the complete hidden copy
a killed replacement left restores it first and says so, before anything else touches the output_dir."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_train_restores_a_final_a_killed_replacement_left_hidden(make_config, tmp_path):
    out = tmp_path / "out"
    hidden = out / ".final.old-999999999"  # renamed aside by a process (long gone) killed before its new final/ landed
    hidden.mkdir(parents=True)
    (hidden / "adapter_model.safetensors").write_bytes(b"the earlier adapter")
    (hidden / "adapter_config.json").write_text("{}")
    # a run that diverges never writes final/: what is there afterwards is what the restore put back
    result = run_cli("train", str(make_config(max_steps=8, learning_rate=10.0)))
    assert result.returncode == 1 and "training diverged" in result.stderr, result.stderr[-3000:]
    assert f"{out / 'final'}: restored the complete copy .final.old-999999999" in result.stdout + result.stderr
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == b"the earlier adapter"
    assert not hidden.exists()
