"""The tracking keys: experiment trackers (Weights & Biases, MLflow, SwanLab), OpenTelemetry metrics on a Prometheus
endpoint, and publishing to the Hugging Face Hub."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from axlora.config.base import StrictModel


class LoggingSettings(StrictModel):
    """Experiment trackers (Weights & Biases, MLflow, SwanLab) and the metrics endpoint: used only when asked for;
    axlora sends nothing itself."""

    use_wandb: bool | None = Field(default=None, description="Log to Weights & Biases (default: when wandb_project is set).")
    wandb_project: str | None = Field(default=None, description="W&B project; setting it turns W&B logging on.")
    wandb_entity: str | None = Field(default=None, description="W&B team or user the run belongs to.")
    wandb_name: str | None = Field(default=None, description="W&B run name.")
    wandb_run_id: str | None = Field(default=None, description="W&B run id (a resumed run continues it).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="online, offline (sync later with `wandb sync`), or disabled."
    )
    wandb_watch: Literal["gradients", "parameters", "all"] | bool | None = Field(
        default=None, description="Log histograms of the trainable weights' gradients (true), parameters or all."
    )
    wandb_log_model: Literal["end", "checkpoint"] | bool | None = Field(
        default=None, description="end (or true): upload the final adapter to W&B as a model artifact; checkpoint: "
        "also upload each checkpoint as it is saved (its directory, training state included)."
    )
    use_mlflow: bool | None = Field(
        default=None, description="Log to MLflow (default: when mlflow_tracking_uri or mlflow_experiment_name is set)."
    )
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking server URI (or a local path).")
    mlflow_experiment_name: str | None = Field(default=None, description="MLflow experiment name.")
    mlflow_run_name: str | None = Field(default=None, description="MLflow run name.")
    hf_mlflow_log_artifacts: bool = Field(
        default=False, description="Upload the final adapter to MLflow as run artifacts."
    )
    use_swanlab: bool | None = Field(
        default=None, description="Log to SwanLab (default: when swanlab_project is set); needs swanlab_project."
    )
    swanlab_project: str | None = Field(
        default=None, min_length=1, description="SwanLab project; setting it turns SwanLab logging on."
    )
    swanlab_experiment_name: str | None = Field(default=None, description="SwanLab experiment (run) name.")
    swanlab_description: str | None = Field(default=None, description="SwanLab experiment description.")
    swanlab_mode: Literal["cloud", "local", "offline", "disabled"] | None = Field(
        default=None, description="cloud (sync to SwanLab; needs SWANLAB_API_KEY or `swanlab login`), local (files "
        "for `swanlab watch`), offline (files to upload later with `swanlab sync`), or disabled. Files go to "
        "output_dir/swanlog unless SWANLAB_LOG_DIR names a directory. Default: SwanLab's own (SWANLAB_MODE, else cloud).",
    )
    use_otel_metrics: bool = Field(
        default=False, description="Serve the training metrics as OpenTelemetry metrics on a Prometheus endpoint, "
        "http://otel_metrics_host:otel_metrics_port/metrics, from the main process while the run is alive: Axolotl's "
        "axolotl_train_loss, axolotl_eval_loss (and every other eval figure as axolotl_eval_*), "
        "axolotl_learning_rate, axolotl_epoch, axolotl_gradient_norm and the counter axolotl_global_steps_total, "
        "updated at each logged step. Needs pip install 'axlora[otel]'.",
    )
    otel_metrics_host: str = Field(
        default="localhost", min_length=1,
        description="Address the metrics endpoint listens on (0.0.0.0: every interface; default localhost).",
    )
    otel_metrics_port: int = Field(
        default=8000, ge=0, le=65535,
        description="Port of the metrics endpoint (default 8000; 0: a free port, printed when the run starts). A port "
        "already in use stops the run at its start.",
    )

    def wandb_enabled(self) -> bool:
        if self.use_wandb is not None:
            return self.use_wandb and self.wandb_mode != "disabled"
        return bool(self.wandb_project) and self.wandb_mode != "disabled"

    def swanlab_enabled(self) -> bool:
        if self.swanlab_mode == "disabled":
            return False
        if self.use_swanlab is not None:
            return self.use_swanlab
        return bool(self.swanlab_project)

    @model_validator(mode="after")
    def _swanlab_needs_a_project(self) -> LoggingSettings:
        if self.use_swanlab and not self.swanlab_project:
            raise ValueError("use_swanlab / swanlab_project: SwanLab logging needs a project: set swanlab_project "
                             "(or use_swanlab: false).")
        return self

    def mlflow_enabled(self) -> bool:
        if self.use_mlflow is not None:
            return self.use_mlflow
        return bool(self.mlflow_tracking_uri or self.mlflow_experiment_name)


class HubSettings(StrictModel):
    """Publishing the trained adapter to the Hugging Face Hub at the end of a run."""

    hub_model_id: str | None = Field(
        default=None, description="Hub repo (user/name) that final/ is pushed to at the end; created private if new."
    )
    hub_strategy: Literal["end"] | None = Field(
        default=None, description="When to push: end (the final adapter, once training is complete)."
    )
    hub_revision: str | None = Field(default=None, description="Branch to push to (default: main).")
