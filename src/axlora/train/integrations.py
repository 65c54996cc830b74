"""Experiment trackers (Weights & Biases, MLflow, SwanLab), the OpenTelemetry metrics endpoint and the Hugging Face
Hub push, when a config asks for them.

They are optional: nothing is imported, started or sent unless the config names it (``wandb_project``,
``mlflow_tracking_uri``/``mlflow_experiment_name``, ``swanlab_project``, ``use_otel_metrics``, ``hub_model_id``), and
axlora itself sends no telemetry. A config that asks for one where its package (or a Hub token) is missing fails when the run
starts, with a ``UserError`` saying what to install, not hours later at the first log call or the push.

The training loop uses one object::

    integrations = start_integrations(config, log=say, enabled=is_main)   # early: missing packages fail fast
    integrations.watch(model)                              # wandb_watch, once the model exists
    integrations.log(row)                                  # every metrics row (has "step")
    integrations.log_table(name, rows, step)               # a table of rows (eval_table_size's predictions)
    integrations.checkpoint_saved(directory, step)         # after each checkpoint (wandb_log_model: checkpoint)
    integrations.finish(RunLayout(output_dir).final, summary)     # uploads, Hub push, closes the runs
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.train.otel_metrics import OtelMetricsRun

Log = Callable[[str], None]


def _import(module: str, key: str, package: str):
    """Import a tracker's package, or say which key asked for it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{key}: the config asks for {package} logging, but the {package} package is not installed: "
            f"pip install {package} (or remove the {key.split('_')[0]}_* keys)."
        ) from None


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row, without the step (trackers take that separately)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _flat_params(config: Config) -> dict[str, str]:
    """The config as tracker parameters: flat, and short enough for MLflow's 500-character limit."""
    params = {}
    for key, value in config.model_dump(mode="json", exclude_none=True).items():
        text = value if isinstance(value, str) else repr(value)
        params[key] = text[:500]
    return params


class WandbRun:
    """A W&B run with the config as its parameters; a ``wandb_run_id`` run resumes if it exists."""

    def __init__(self, config: Config, model, log: Log):
        wandb = _import("wandb", "wandb_project", "wandb")
        self.wandb = wandb
        self.log_model = config.wandb_log_model in ("end", "checkpoint", True)
        self.log_checkpoints = config.wandb_log_model == "checkpoint"
        self.run = wandb.init(
            project=config.wandb_project,
            entity=config.wandb_entity,
            name=config.wandb_name,
            id=config.wandb_run_id,
            resume="allow" if config.wandb_run_id else None,
            mode=config.wandb_mode,
            config=config.model_dump(mode="json", exclude_none=True),
        )
        self.watch_what = {True: "gradients"}.get(config.wandb_watch, config.wandb_watch)
        if model is not None:
            self.watch(model)
        log(f"wandb: logging to project {config.wandb_project or '(default)'}")

    def watch(self, model) -> None:
        if self.watch_what and self.watch_what != "false":
            self.wandb.watch(model, log=self.watch_what)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_numbers(row), step=int(row["step"]))

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        self.run.log({name: self.wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])},
                     step=step)

    def checkpoint_saved(self, directory: Path, step: int) -> None:
        if self.log_checkpoints:
            artifact = self.wandb.Artifact(name=f"checkpoint-{self.run.id}", type="model", metadata={"step": step})
            artifact.add_dir(str(directory))
            self.run.log_artifact(artifact, aliases=[f"step-{step}", "latest"])

    def finish(self, final_dir: Path, summary: dict[str, Any]) -> None:
        if self.log_model:
            artifact = self.wandb.Artifact(name=f"adapter-{self.run.id}", type="model")
            artifact.add_dir(str(final_dir))
            self.run.log_artifact(artifact)
        self.run.summary.update(_numbers({k: v for k, v in summary.items() if k != "samples"}))
        self.run.finish()


class MlflowRun:
    """An MLflow run under ``mlflow_experiment_name`` with the config as its parameters."""

    def __init__(self, config: Config, log: Log):
        key = "mlflow_tracking_uri" if config.mlflow_tracking_uri else "mlflow_experiment_name"
        mlflow = _import("mlflow", key, "mlflow")
        self.mlflow = mlflow
        self.log_artifacts = config.hf_mlflow_log_artifacts
        if config.mlflow_tracking_uri:
            mlflow.set_tracking_uri(config.mlflow_tracking_uri)
        if config.mlflow_experiment_name:
            mlflow.set_experiment(config.mlflow_experiment_name)
        self.run = mlflow.start_run(run_name=config.mlflow_run_name)
        mlflow.log_params(_flat_params(config))
        log(f"mlflow: logging to experiment {config.mlflow_experiment_name or '(default)'}")

    def watch(self, model) -> None:
        """MLflow has no gradient histograms."""

    def log(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_numbers(row), step=int(row["step"]))

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        self.mlflow.log_table(data={c: [row[c] for row in rows] for c in columns},
                              artifact_file=f"{name}/step-{step}.json")

    def checkpoint_saved(self, directory: Path, step: int) -> None:
        """MLflow uploads the final adapter only (hf_mlflow_log_artifacts)."""

    def finish(self, final_dir: Path, summary: dict[str, Any]) -> None:
        if self.log_artifacts:
            self.mlflow.log_artifacts(str(final_dir), artifact_path="final")
        self.mlflow.end_run()


SWANLAB_DIR = "swanlog"
"""SwanLab's files, under output_dir (outside logs/, which a fresh run sets aside while SwanLab writes)."""

_SWANLAB_MODES = {"cloud": "online", "local": "local", "offline": "offline"}
"""Axolotl's swanlab_mode names -> the SwanLab SDK's (which calls cloud "online")."""


def swanlab_log_dir(config: Config) -> Path | None:
    """output_dir/swanlog, unless the environment names SwanLab's directory (then SwanLab reads it itself)."""
    if os.environ.get("SWANLAB_LOG_DIR") or os.environ.get("SWANLAB_LOGDIR"):
        return None
    return Path(config.output_dir) / SWANLAB_DIR


class SwanLabRun:
    """A SwanLab experiment with the config as its parameters (Axolotl's SwanLabPlugin, built in)."""

    def __init__(self, config: Config, log: Log):
        swanlab = _import("swanlab", "use_swanlab" if config.use_swanlab else "swanlab_project", "swanlab")
        self.swanlab = swanlab
        log_dir = swanlab_log_dir(config)
        # SwanLab's Ctrl+C handler would close the run mid-step; axlora's own ends the step and saves first
        sigint = signal.getsignal(signal.SIGINT)
        try:
            self.run = swanlab.init(
                project=config.swanlab_project, name=config.swanlab_experiment_name,
                description=config.swanlab_description, mode=_SWANLAB_MODES.get(config.swanlab_mode or ""),
                log_dir=str(log_dir) if log_dir else None, config=config.model_dump(mode="json", exclude_none=True),
                reinit=True, settings=swanlab.Settings(interactive=False),  # a batch job must not wait for a login
            )
        except RuntimeError as error:  # cloud mode without an API key
            raise UserError(f"swanlab_mode: {error} Set SWANLAB_API_KEY or run `swanlab login`, or set "
                            "swanlab_mode: offline (upload later with `swanlab sync`) or local.") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)
        log(f"swanlab: logging to project {config.swanlab_project} ({self.run.mode})")

    def watch(self, model) -> None:
        """SwanLab has no gradient histograms."""

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_numbers(row), step=int(row["step"]))

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        table = self.swanlab.echarts.Table().add(columns, [[row[c] for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def checkpoint_saved(self, directory: Path, step: int) -> None:
        """SwanLab keeps metrics, not files."""

    def finish(self, final_dir: Path, summary: dict[str, Any]) -> None:
        self.run.finish()


def require_hub_access(config: Config) -> None:
    """A push at the end needs huggingface_hub online and a token: check now, not after training."""
    if not config.hub_model_id:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise UserError("hub_model_id: HF_HUB_OFFLINE is set, so the push at the end would fail; "
                        "unset HF_HUB_OFFLINE or remove hub_model_id.")
    hub = _import("huggingface_hub", "hub_model_id", "huggingface_hub")
    if not hub.get_token():
        raise UserError("hub_model_id: no Hugging Face token: run `hf auth login` or set HF_TOKEN, "
                        "or remove hub_model_id.")


def push_to_hub(config: Config, folder: Path, log: Log = print, api=None) -> str:
    """Upload ``folder`` (the final adapter) to ``hub_model_id``; the repo is created private when new."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = api.create_repo(repo_id=config.hub_model_id, private=True, exist_ok=True)
    if config.hub_revision:
        api.create_branch(repo_id=config.hub_model_id, branch=config.hub_revision, exist_ok=True)
    api.upload_folder(
        repo_id=config.hub_model_id,
        folder_path=str(folder),
        revision=config.hub_revision,
        commit_message=f"axlora: {folder.name} adapter",
    )
    url = str(getattr(repo, "url", None) or f"https://huggingface.co/{config.hub_model_id}")
    log(f"hub: pushed {folder} to {url}" + (f" (branch {config.hub_revision})" if config.hub_revision else ""))
    return url


class Integrations:
    """The trackers and Hub push of one run; inert on non-main processes and when the config asks for none."""

    def __init__(self, config: Config, runs: list, log: Log, enabled: bool):
        self.config = config
        self.runs = runs
        self.say = log
        self.enabled = enabled

    def watch(self, model) -> None:
        """Start gradient/parameter histograms (``wandb_watch``) once the model exists."""
        for run in self.runs:
            run.watch(model)

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics row (as written to logs/metrics.jsonl) to every tracker."""
        for run in self.runs:
            run.log(row)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Send a table of rows (the same keys in each) to every tracker, as of ``step``."""
        for run in self.runs:
            run.log_table(name, rows, step)

    def checkpoint_saved(self, directory: Path, step: int) -> None:
        """A checkpoint was written: upload it where the config asks (``wandb_log_model: checkpoint``)."""
        for run in self.runs:
            run.checkpoint_saved(directory, step)

    def finish(self, final_dir: Path, summary: dict[str, Any]) -> None:
        """Upload what was asked for, push to the Hub, and close the runs."""
        for run in self.runs:
            run.finish(final_dir, summary)
        if self.enabled and self.config.hub_model_id:
            push_to_hub(self.config, final_dir, self.say)


def start_integrations(config: Config, model=None, log: Log = print, enabled: bool = True) -> Integrations:
    """Check and start what the config asks for (``UserError`` when a package or token is missing)."""
    if not enabled:
        return Integrations(config, [], log, enabled=False)
    require_hub_access(config)
    runs: list = []
    if config.wandb_enabled():
        runs.append(WandbRun(config, model, log))
    if config.mlflow_enabled():
        runs.append(MlflowRun(config, log))
    if config.swanlab_enabled():
        runs.append(SwanLabRun(config, log))
    if config.use_otel_metrics:
        runs.append(OtelMetricsRun(config, log))
    return Integrations(config, runs, log, enabled=True)
