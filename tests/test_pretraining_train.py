"""Continued pretraining on a streamed corpus, end to end: a resumed run is bitwise the uninterrupted one and reads on
from the saved token position; two processes train what one does."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from conftest import assert_close_final_adapters, assert_same_final_adapter, logged, run_cli, train_ok

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(5)
    path = tmp_path / "corpus.jsonl"
    lines = []
    for _ in range(60):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(json.dumps({"text": " ".join(f"{a}+{b}={a + b}." for _ in range(rng.randint(1, 12)))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _settings(corpus, **overrides):
    return {"datasets": None, "pretraining_dataset": [{"path": str(corpus)}], "sequence_len": 48,
            "sample_packing": True, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4,
            "save_steps": 2, "seed": 3, **overrides}


def test_a_resumed_run_continues_at_the_saved_token_and_ends_bitwise_equal(make_config, tmp_path, corpus):
    train_ok(make_config("full.yml", output_dir=str(tmp_path / "full"), **_settings(corpus)))
    saved = json.loads((tmp_path / "full" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    position = saved["pretraining_stream"]
    assert position["row"] == 8 and position["document"] >= 1
    # the documents before the saved one are no longer readable (same size, so the corpus still matches):
    # a resume that read the stream from its start again would fail on them
    lines = corpus.read_text().splitlines(keepends=True)
    lines[:position["document"]] = ["#" * (len(line) - 1) + "\n" for line in lines[:position["document"]]]
    corpus.write_text("".join(lines))

    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    result = train_ok(make_config("resume.yml", output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="auto",
                                  **_settings(corpus)))
    assert "resumed from checkpoints/step-2 at step 2/4" in result.stdout
    assert logged(tmp_path / "resumed") == logged(tmp_path / "full")[2:]
    assert_same_final_adapter(tmp_path / "resumed", tmp_path / "full")

    corpus.write_text(corpus.read_text() + '{"text": "more"}\n')  # a corpus that changed is not resumed
    refused = run_cli("train", str(make_config("again.yml", output_dir=str(tmp_path / "resumed"),
                                               resume_from_checkpoint="auto", **_settings(corpus, max_steps=6))))
    assert refused.returncode == 2 and "fingerprint" in refused.stderr


def test_two_processes_stream_the_rows_one_process_trains_on(make_config, tmp_path, corpus):
    common = _settings(corpus, sample_packing=False, max_steps=3, save_steps=None)
    train_ok(make_config("one.yml", output_dir=str(tmp_path / "one"), **{**common, "micro_batch_size": 2}))
    result = train_ok(make_config("two.yml", output_dir=str(tmp_path / "two"),
                                  **{**common, "micro_batch_size": 1, "num_processes": 2}))
    assert "launch: 2 processes" in result.stdout and "data: prepared" not in result.stdout
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-6)
