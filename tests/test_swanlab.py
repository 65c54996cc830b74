"""SwanLab tracking (Axolotl's SwanLabPlugin keys) through the real swanlab package, offline: nothing is sent.

The metrics are read back from the run file SwanLab writes under output_dir/swanlog.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import yaml

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train.integrations import SWANLAB_DIR, start_integrations

from conftest import logged, main_in_process, train_ok

swanlab = pytest.importorskip("swanlab")


@pytest.fixture(autouse=True)
def _swanlab_home(tmp_path, monkeypatch):
    """SwanLab's settings and login live in a throwaway home; no key, no directory from the environment."""
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-home"))
    for name in ("SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_LOG_DIR", "SWANLAB_LOGDIR"):
        monkeypatch.delenv(name, raising=False)


def records(output_dir: Path) -> list:
    """Every record of the one SwanLab run under ``output_dir`` (SwanLab's own reader and protobuf)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (run_file,) = (output_dir / SWANLAB_DIR).glob("run-*/run-*.swanlab")
    reader, found = DataStoreReader(), []
    reader.open(run_file)
    while (data := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(data)
        found.append(record)
    reader.close()
    return found


def scalars(output_dir: Path, key: str) -> dict[int, float]:
    """step -> value of one metric as SwanLab stored it."""
    return {r.scalar.step: r.scalar.value.number for r in records(output_dir)
            if r.WhichOneof("record_type") == "scalar" and r.scalar.key == key}


def swanlab_config(make_config, **keys):
    path = make_config(swanlab_project="axlora-tests", swanlab_mode="offline", **keys)
    return load_config(path, log=lambda _note: None)


def test_metrics_config_and_tables_reach_swanlab(make_config, tmp_path):
    config = swanlab_config(make_config, swanlab_experiment_name="run-1", swanlab_description="tiny run")
    before = signal.getsignal(signal.SIGINT)
    messages: list[str] = []
    run = start_integrations(config, log=messages.append)
    assert signal.getsignal(signal.SIGINT) is before  # axlora's stop handling keeps Ctrl+C
    run.log({"step": 1, "loss": 2.5, "lr": 0.01, "note": "not a number"})
    run.log({"step": 2, "loss": 1.25, "lr": 0.005})
    run.log_table("eval_predictions", [{"prompt": "1+1=", "prediction": "2"}], step=2)
    run.finish(tmp_path / "out" / "final", {})
    out = tmp_path / "out"
    assert scalars(out, "loss") == {1: 2.5, 2: 1.25} and scalars(out, "lr") == {1: 0.01, 2: 0.005}
    assert not scalars(out, "note")
    start = next(r.start for r in records(out) if r.WhichOneof("record_type") == "start")
    assert (start.project, start.name, start.description) == ("axlora-tests", "run-1", "tiny run")
    (saved,) = (out / SWANLAB_DIR).glob("run-*/files/config.yaml")
    assert yaml.safe_load(saved.read_text())["lora_r"]["value"] == 4
    (table,) = (out / SWANLAB_DIR).glob("run-*/media/echarts/*.json")
    assert json.loads(table.read_text())["rowData"] == [{"prompt": "1+1=", "prediction": "2"}]
    assert messages == ["swanlab: logging to project axlora-tests (offline)"]


def test_swanlab_follows_axolotls_switches(make_config):
    assert swanlab_config(make_config).swanlab_enabled()
    assert not swanlab_config(make_config, use_swanlab=False).swanlab_enabled()
    assert not load_config(make_config(swanlab_project="p", swanlab_mode="disabled"), log=print).swanlab_enabled()
    plugin_only = load_config(make_config(plugins=["axolotl.integrations.swanlab.SwanLabPlugin"]), log=print)
    assert not plugin_only.swanlab_enabled() and start_integrations(plugin_only).runs == []


def test_a_missing_swanlab_package_names_the_key_and_the_install(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "swanlab", None)  # importing it fails
    with pytest.raises(UserError, match=r"swanlab_project: .*pip install swanlab"):
        start_integrations(swanlab_config(make_config))
    with pytest.raises(UserError, match=r"use_swanlab: .*pip install swanlab"):
        start_integrations(swanlab_config(make_config, use_swanlab=True))


def test_cloud_mode_without_a_key_stops_at_the_start_instead_of_prompting(make_config):
    config = load_config(make_config(swanlab_project="p", swanlab_mode="cloud"), log=lambda _n: None)
    with pytest.raises(UserError, match=r"swanlab_mode: .*SWANLAB_API_KEY.*swanlab_mode: offline"):
        start_integrations(config)


@pytest.mark.parametrize(("keys", "message"), [
    ({"use_swanlab": True}, "use_swanlab / swanlab_project: SwanLab logging needs a project"),
    ({"swanlab_project": "p", "swanlab_mode": "online"}, "swanlab_mode"),
])
def test_bad_swanlab_keys_are_config_errors(make_config, capsys, keys, message):
    result = main_in_process(capsys, "validate", str(make_config(**keys)))
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
def test_a_training_run_logs_its_metrics_to_swanlab(make_config, tmp_path):
    out = tmp_path / "out"
    train_ok(make_config(swanlab_project="axlora-tests", swanlab_mode="offline", max_steps=2,
                         plugins=["axolotl.integrations.swanlab.SwanLabPlugin"]))
    assert len(logged(out)) == 2
    assert scalars(out, "loss") == pytest.approx(dict(enumerate(logged(out), start=1)))
    assert any(r.WhichOneof("record_type") == "finish" for r in records(out))
