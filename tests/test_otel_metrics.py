"""OpenTelemetry metrics (Axolotl's use_otel_metrics keys) through the real opentelemetry-sdk, its Prometheus exporter
and prometheus_client's HTTP server, scraped over HTTP on this machine's loopback interface."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request

import pytest

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train.integrations import start_integrations
from axlora.train.otel_metrics import OtelMetricsRun

from conftest import main_in_process

pytest.importorskip("opentelemetry.exporter.prometheus")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

SCOPE = {"otel_scope_name": "axlora.training"}


def scrape(url: str) -> dict[str, float]:
    """Metric sample name -> value of the axlora meter's samples, read from the endpoint as Prometheus would."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("otel_scope_name") == SCOPE["otel_scope_name"]}


def otel_config(make_config, **keys):
    path = make_config(**{"use_otel_metrics": True, "otel_metrics_host": "127.0.0.1", "otel_metrics_port": 0, **keys})
    return load_config(path, log=lambda _note: None)


def test_logged_rows_are_served_under_axolotls_metric_names(make_config, tmp_path):
    messages: list[str] = []
    run = start_integrations(otel_config(make_config), log=messages.append)
    (otel,) = run.runs
    assert messages == [f"otel: serving metrics on http://127.0.0.1:{otel.port}/metrics"]
    run.log({"step": 5, "epoch": 0.5, "loss": 2.5, "lr": 0.01, "grad_norm": 0.75, "tokens_per_second": 9.0})
    run.log({"step": 6, "loss": 1.25, "eval_loss": 1.5, "eval_rewards/chosen": 0.25, "note": "not a number"})
    seen = scrape(otel.url)
    assert seen == {
        "axolotl_train_loss": 1.25, "axolotl_eval_loss": 1.5, "axolotl_learning_rate": 0.01, "axolotl_epoch": 0.5,
        "axolotl_gradient_norm": 0.75, "axolotl_eval_rewards_chosen": 0.25,
        "axolotl_global_steps_total": 6.0,  # a resumed run's first row (step 5) counts the steps before it
    }
    run.finish(tmp_path / "out" / "final", {})
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(otel.url, timeout=5)


def test_a_port_in_use_names_the_key(make_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = otel_config(make_config, otel_metrics_port=taken.getsockname()[1])
        with pytest.raises(UserError, match=r"otel_metrics_port: cannot serve metrics on 127\.0\.0\.1:\d+"):
            start_integrations(config)


def test_off_by_default_and_only_on_the_main_process(make_config):
    assert start_integrations(load_config(make_config(), log=print)).runs == []
    assert start_integrations(otel_config(make_config), enabled=False).runs == []


def test_a_missing_package_exits_2_naming_what_to_install(make_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.prometheus", None)  # importing it fails
    path = make_config(use_otel_metrics=True, otel_metrics_port=0)
    result = main_in_process(capsys, "train", str(path))
    assert result.returncode == 2
    assert "use_otel_metrics: " in result.stderr and "opentelemetry-exporter-prometheus" in result.stderr
    assert "Traceback" not in result.stderr


def test_axolotls_keys_validate_and_a_bad_port_is_a_config_error(make_config, capsys):
    axolotl_keys = {"use_otel_metrics": True, "otel_metrics_host": "localhost", "otel_metrics_port": 8000}
    assert main_in_process(capsys, "validate", str(make_config(**axolotl_keys))).returncode == 0
    result = main_in_process(capsys, "validate", str(make_config(**{**axolotl_keys, "otel_metrics_port": 70000})))
    assert result.returncode == 2 and "otel_metrics_port" in result.stderr


@pytest.mark.slow
def test_a_training_run_serves_the_values_it_logs(make_config, tmp_path, monkeypatch):
    """The real loop in this process; each logged row is followed by a scrape of the live endpoint."""
    from axlora.train.recipe import run_training

    scraped: dict[int, dict[str, float]] = {}
    log_row = OtelMetricsRun.log

    def log_and_scrape(self, row):
        log_row(self, row)
        scraped[row["step"]] = scrape(self.url)

    monkeypatch.setattr(OtelMetricsRun, "log", log_and_scrape)
    out = tmp_path / "out"
    config = otel_config(make_config, max_steps=3, val_set_size=0.1, eval_steps=3)
    run_training(config, log=lambda _line: None)
    rows = {row["step"]: row for row in map(json.loads, (out / "logs" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(scraped) == sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        seen = scraped[step]
        assert seen["axolotl_train_loss"] == pytest.approx(row["loss"])
        assert seen["axolotl_learning_rate"] == pytest.approx(row["lr"])
        assert seen["axolotl_gradient_norm"] == pytest.approx(row["grad_norm"])
        assert seen["axolotl_epoch"] == pytest.approx(row["epoch"])
        assert seen["axolotl_global_steps_total"] == step
    assert scraped[3]["axolotl_eval_loss"] == pytest.approx(rows[3]["eval_loss"])
    assert "axolotl_eval_loss" not in scraped[1]
