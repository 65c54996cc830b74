"""wandb / mlflow / Hub push: real calls into stand-in packages (no network), clear errors when missing."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train import integrations
from axlora.train.integrations import push_to_hub, require_hub_access, start_integrations


class Recorder:
    """A stand-in package module: records every call made on it (and on what its calls return)."""

    def __init__(self, name: str, calls: list):
        self._name, self._calls = name, calls

    def __getattr__(self, attr):
        return Recorder(f"{self._name}.{attr}", self._calls)

    def __call__(self, *args, **kwargs):
        self._calls.append((self._name, args, kwargs))
        return Recorder(f"{self._name}()", self._calls)


@pytest.fixture
def fake_package(monkeypatch):
    def install(name: str) -> list:
        calls: list = []
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: getattr(Recorder(name, calls), attr)
        monkeypatch.setitem(sys.modules, name, module)
        return calls

    return install


def config_of(make_config, **keys):
    return load_config(make_config(**keys), log=lambda _note: None)


def names(calls) -> list[str]:
    return [name for name, _, _ in calls]


def test_nothing_is_started_unless_asked(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = start_integrations(config_of(make_config))
    assert run.runs == []
    run.log({"step": 1, "loss": 1.0})
    run.finish(Path("final"), {})


def test_wandb_run_gets_config_metrics_and_the_final_adapter(make_config, fake_package, tmp_path):
    calls = fake_package("wandb")
    config = config_of(make_config, wandb_project="proj", wandb_entity="team", wandb_name="r1",
                       wandb_mode="offline", wandb_watch="gradients", wandb_log_model="end")
    messages: list[str] = []
    run = start_integrations(config, log=messages.append)
    run.watch("MODEL")  # once the model exists
    init = calls[0]
    assert init[0] == "wandb.init"
    assert init[2]["project"] == "proj" and init[2]["entity"] == "team" and init[2]["name"] == "r1"
    assert init[2]["mode"] == "offline" and init[2]["config"]["wandb_project"] == "proj"
    assert calls[1][0] == "wandb.watch" and calls[1][1] == ("MODEL",) and calls[1][2] == {"log": "gradients"}
    run.log({"step": 5, "epoch": 0.5, "loss": 2.5, "lr": 1e-4, "note": "text"})
    assert calls[2][0] == "wandb.init().log"
    assert calls[2][1] == ({"epoch": 0.5, "loss": 2.5, "lr": 1e-4},) and calls[2][2] == {"step": 5}
    run.finish(tmp_path, {"steps": 10, "final_train_loss": 1.5, "samples": []})
    assert "wandb.Artifact" in names(calls) and "wandb.init().log_artifact" in names(calls)
    assert "wandb.init().summary.update" in names(calls) and names(calls)[-1] == "wandb.init().finish"
    assert messages == ["wandb: logging to project proj"]


def test_mlflow_run_gets_params_metrics_and_artifacts(make_config, fake_package, tmp_path):
    calls = fake_package("mlflow")
    config = config_of(make_config, mlflow_tracking_uri="file:///tmp/mlruns", mlflow_experiment_name="exp",
                       mlflow_run_name="r1", hf_mlflow_log_artifacts=True)
    run = start_integrations(config, log=lambda _m: None)
    assert names(calls)[:4] == ["mlflow.set_tracking_uri", "mlflow.set_experiment", "mlflow.start_run",
                                "mlflow.log_params"]
    assert calls[2][2] == {"run_name": "r1"}
    params = calls[3][1][0]
    assert params["learning_rate"] == "0.01" and all(len(v) <= 500 for v in params.values())
    run.log({"step": 3, "loss": 1.0, "eval_loss": 1.2})
    assert calls[4] == ("mlflow.log_metrics", ({"loss": 1.0, "eval_loss": 1.2},), {"step": 3})
    run.finish(tmp_path, {})
    assert calls[-2] == ("mlflow.log_artifacts", (str(tmp_path),), {"artifact_path": "final"})
    assert names(calls)[-1] == "mlflow.end_run"


@pytest.mark.parametrize(("keys", "package"), [({"wandb_project": "p"}, "wandb"),
                                               ({"mlflow_experiment_name": "e"}, "mlflow")])
def test_asking_for_a_missing_tracker_is_a_clear_error(make_config, monkeypatch, keys, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(UserError, match=f"the {package} package is not installed: pip install {package}"):
        start_integrations(config_of(make_config, **keys))


def test_other_processes_start_nothing(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run = start_integrations(config_of(make_config, wandb_project="p", hub_model_id="u/m"), enabled=False)
    assert run.runs == []
    run.finish(Path("final"), {})  # and push nothing


def test_hub_access_is_checked_before_training(make_config, monkeypatch):
    config = config_of(make_config, hub_model_id="me/adapter")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub_model_id: HF_HUB_OFFLINE is set"):
        require_hub_access(config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="hub_model_id: no Hugging Face token"):
        require_hub_access(config)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    require_hub_access(config)


def test_push_uploads_the_final_adapter_to_a_private_repo(make_config, tmp_path):
    calls: list = []
    api = Recorder("api", calls)
    config = config_of(make_config, hub_model_id="me/adapter", hub_revision="v1")
    messages: list[str] = []
    push_to_hub(config, tmp_path / "final", messages.append, api=api)
    assert calls[0] == ("api.create_repo", (), {"repo_id": "me/adapter", "private": True, "exist_ok": True})
    assert calls[1] == ("api.create_branch", (), {"repo_id": "me/adapter", "branch": "v1", "exist_ok": True})
    assert calls[2][0] == "api.upload_folder"
    assert calls[2][2]["folder_path"] == str(tmp_path / "final") and calls[2][2]["revision"] == "v1"
    assert messages[0].startswith(f"hub: pushed {tmp_path / 'final'} to ") and "(branch v1)" in messages[0]


def test_finish_pushes_when_asked(make_config, tmp_path, monkeypatch):
    pushed: list = []
    monkeypatch.setattr(integrations, "push_to_hub", lambda config, folder, log: pushed.append(folder))
    monkeypatch.setattr(integrations, "require_hub_access", lambda config: None)
    run = start_integrations(config_of(make_config, hub_model_id="me/adapter"))
    run.finish(tmp_path / "final", {})
    assert pushed == [tmp_path / "final"]
