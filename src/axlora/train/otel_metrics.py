"""OpenTelemetry metrics on a Prometheus endpoint (``use_otel_metrics``), under Axolotl's metric names.

The main process serves ``http://otel_metrics_host:otel_metrics_port/metrics`` from the start of the run to its
end. Each logged metrics row sets the gauges Axolotl's OpenTelemetry callback exports (``axolotl_train_loss``,
``axolotl_eval_loss``, ``axolotl_learning_rate``, ``axolotl_epoch``, ``axolotl_gradient_norm``, and every other
eval figure as ``axolotl_eval_*``) and brings the counter ``axolotl_global_steps`` up to the row's step, so a
dashboard built for Axolotl reads an axlora run unchanged. Like Axolotl, the endpoint serves prometheus_client's
default registry, which also carries the process and Python figures.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError

INSTALL = "pip install opentelemetry-sdk opentelemetry-exporter-prometheus prometheus-client"
"""What ``use_otel_metrics`` needs (the ``otel`` extra: pip install 'axlora[otel]')."""

SCOPE = "axlora.training"
"""The meter's name: Prometheus shows it as the otel_scope_name label."""

ROW_GAUGES = {
    "loss": ("axolotl_train_loss", "Current training loss"),
    "eval_loss": ("axolotl_eval_loss", "Current evaluation loss"),
    "lr": ("axolotl_learning_rate", "Current learning rate"),
    "epoch": ("axolotl_epoch", "Current training epoch"),
    "grad_norm": ("axolotl_gradient_norm", "Gradient norm"),
}
"""Metrics row key -> (Axolotl's gauge name, its description)."""

STEPS_COUNTER = "axolotl_global_steps"
"""Steps completed; Prometheus adds ``_total`` to a counter's name."""


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"use_otel_metrics: the config asks for OpenTelemetry metrics, but the {package} package is "
                        f"not installed: {INSTALL} (or pip install 'axlora[otel]'), or set use_otel_metrics: "
                        "false.") from None


def eval_gauge_name(key: str) -> str:
    """``eval_rewards/chosen`` -> ``axolotl_eval_rewards_chosen`` (Prometheus names are letters, digits, _)."""
    return "axolotl_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


class OtelMetricsRun:
    """The metrics endpoint of one run, fed by the same rows as logs/metrics.jsonl."""

    def __init__(self, config: Config, log: Callable[[str], None]):
        sdk_metrics = _import("opentelemetry.sdk.metrics", "opentelemetry-sdk")
        resources = _import("opentelemetry.sdk.resources", "opentelemetry-sdk")
        exporter = _import("opentelemetry.exporter.prometheus", "opentelemetry-exporter-prometheus")
        prometheus = _import("prometheus_client", "prometheus-client")
        host, port = config.otel_metrics_host, config.otel_metrics_port
        try:  # before anything is registered, so a refused port leaves nothing behind
            self.server, _thread = prometheus.start_http_server(port, addr=host)
        except OSError as error:
            raise UserError(f"otel_metrics_port: cannot serve metrics on {host}:{port} ({error.strerror or error}); "
                            "choose a free port (0: any free one) or another otel_metrics_host.") from None
        self.port = self.server.server_port
        self.provider = sdk_metrics.MeterProvider(
            metric_readers=[exporter.PrometheusMetricReader()],
            resource=resources.Resource.create({"service.name": "axlora"}),
        )
        self.meter = self.provider.get_meter(SCOPE)
        self.gauges = {key: self.meter.create_gauge(name, unit="1", description=text)
                       for key, (name, text) in ROW_GAUGES.items()}
        self.steps = self.meter.create_counter(STEPS_COUNTER, unit="1", description="Total training steps completed")
        self.steps_counted = 0
        self.url = f"http://{host}:{self.port}/metrics"
        log(f"otel: serving metrics on {self.url}")

    def _gauge(self, key: str):
        """The gauge of a row key; an eval figure without its own gets one on first sight (as Axolotl does)."""
        if key not in self.gauges and key.startswith("eval_"):
            self.gauges[key] = self.meter.create_gauge(eval_gauge_name(key), unit="1",
                                                       description=f"Evaluation metric: {key}")
        return self.gauges.get(key)

    def watch(self, model) -> None:
        """No gradient histograms: the endpoint serves scalars."""

    def log(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            gauge = self._gauge(key)
            if gauge is not None:
                gauge.set(float(value))
        step = int(row["step"])
        if step > self.steps_counted:  # a resumed run's first row counts the steps before it too
            self.steps.add(step - self.steps_counted)
            self.steps_counted = step

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Tables are not metrics."""

    def checkpoint_saved(self, directory, step: int) -> None:
        """The endpoint keeps metrics, not files."""

    def finish(self, final_dir, summary: dict[str, Any]) -> None:
        """Stop serving and take this run's metrics out of the registry."""
        self.server.shutdown()
        self.server.server_close()
        self.provider.shutdown()
