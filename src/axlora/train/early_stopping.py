"""The best adapter by an evaluation metric (``load_best_model_at_end``, ``metric_for_best_model``,
``greater_is_better``) and ``early_stopping_patience``: stop when that metric stops improving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError


@dataclass
class EarlyStopping:
    """Count evaluations without a better metric, keep the best adapter.

    The metric is ``eval_loss`` (lower is better) unless ``metric_for_best_model`` names another ``eval_*`` value of
    the evaluation row. The best weights are a copy of the (small) adapter held in memory and written into each
    checkpoint, so the run ends with the best adapter in ``final/`` (transformers' ``load_best_model_at_end``) even
    when it was resumed after the best step. With ``eval_on_start`` the starting adapter (step 0) is a candidate
    too: a continued run that never beats its baseline hands that adapter back unchanged.
    """

    patience: int | None
    metric: str = "eval_loss"
    greater_is_better: bool = False
    keep_best: bool = False  # load_best_model_at_end without patience: keep the best, never stop early
    best_step: int | None = None
    best_value: float | None = None
    evals_without_improvement: int = 0
    best_weights: dict | None = None

    @classmethod
    def from_config(cls, config: Config) -> EarlyStopping:
        """The settings of the config; a best model needs evaluations, so validation rows are required."""
        keep_best = config.load_best_model_at_end or config.early_stopping_patience is not None
        if config.load_best_model_at_end and not config.val_set_size:
            raise UserError("load_best_model_at_end: needs validation rows to evaluate; set val_set_size (e.g. 0.05).")
        if config.load_best_model_at_end and config.eval_strategy == "no":
            raise UserError("load_best_model_at_end / eval_strategy: picking the best adapter needs evaluations; "
                            "eval_strategy: no turns them off.")
        metric, higher = config.best_metric()
        return cls(config.early_stopping_patience, metric, higher, keep_best)

    @property
    def enabled(self) -> bool:
        return self.keep_best or self.patience is not None

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def observe(self, step: int, row: dict[str, float], model, parallel) -> None:
        """Compare this evaluation's metric with the best so far; keep a copy of the adapter when it is better."""
        if not self.enabled:
            return
        value = _main_process_value(row.get(self.metric), parallel)
        if value is None:
            logged = ", ".join(sorted(key for key in row if key.startswith("eval_")))
            raise UserError(f"metric_for_best_model: '{self.metric}' is not among the evaluation's metrics "
                            f"({logged}); name one of them.")
        if self.best_value is None or self._better(value, self.best_value):
            self.best_step, self.best_value, self.evals_without_improvement = step, value, 0
            with parallel.gathered_adapter():
                self.best_weights = _adapter_weights(model)
        else:
            self.evals_without_improvement += 1

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.greater_is_better else value < best

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "best_step": self.best_step, "best_value": self.best_value,
                "evals_without_improvement": self.evals_without_improvement}

    def restore(self, state: dict[str, Any] | None, weights: dict | None) -> None:
        if not (self.enabled and state):
            return
        if state.get("metric", "eval_loss") != self.metric:  # a best by another metric is no best by this one
            return
        self.best_step = state.get("best_step")
        self.best_value = state.get("best_value", state.get("best_eval_loss"))  # checkpoints of earlier versions
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.best_weights = weights

    def restore_best(self, model) -> None:
        if self.best_weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, self.best_weights)

    def best_line(self, steps_trained: int) -> str:
        return (f"final: the best adapter, step {self.best_step} ({self.metric} {self.best_value:.4f}), "
                f"of {steps_trained} steps trained")

    def stop_message(self, step: int) -> str:
        return (f"early stopping: {self.metric} has not improved on step {self.best_step}'s "
                f"{self.best_value:.4f} for {self.patience} evaluations; stopping at step {step}")

    def summary(self, steps_trained: int, planned_steps: int) -> dict[str, Any]:
        direction = "highest" if self.greater_is_better else "lowest"
        return {
            "patience": self.patience,
            "load_best_model_at_end": True,
            "metric_for_best_model": self.metric,
            "greater_is_better": self.greater_is_better,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "best_eval_loss": self.best_value if self.metric == "eval_loss" else None,
            "stopped_early_at_step": steps_trained if steps_trained < planned_steps else None,
            "final_adapter": f"the adapter of step {self.best_step} ({direction} {self.metric}), "
                             f"not of the last step trained ({steps_trained})",
        }


def _main_process_value(value: float | None, parallel) -> float | None:
    """The main process's value: scores of generated text are computed there only, and every rank must agree on
    which adapter is best and when to stop."""
    if parallel.world_size > 1:
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return None if value is None else float(value)


def _adapter_weights(model) -> dict:
    """A CPU copy of the adapter's weights (read inside ``gathered_adapter``: whole under ZeRO-3)."""
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone().cpu() for key, value in get_peft_model_state_dict(model).items()}
