"""``early_stopping_patience``: stop when eval_loss stops improving, and end with the best adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Count evaluations without a lower eval_loss, keep the best adapter.

    The best weights are a copy of the (small) adapter held in memory and written into each checkpoint,
    so the run ends with the best adapter in ``final/`` (transformers' ``load_best_model_at_end``) even
    when it was resumed after the best step. With ``eval_on_start`` the starting adapter (step 0) is a
    candidate too: a continued run that never beats its baseline hands that adapter back unchanged.
    """

    patience: int | None
    best_step: int | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    best_weights: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def observe(self, step: int, eval_loss: float, model, parallel) -> None:
        if not self.enabled:
            return
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_step, self.best_eval_loss, self.evals_without_improvement = step, eval_loss, 0
            with parallel.gathered_adapter():
                self.best_weights = _adapter_weights(model)
        else:
            self.evals_without_improvement += 1

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_eval_loss": self.best_eval_loss,
                "evals_without_improvement": self.evals_without_improvement}

    def restore(self, state: dict[str, Any] | None, weights: dict | None) -> None:
        if self.enabled and state:
            self.best_step = state.get("best_step")
            self.best_eval_loss = state.get("best_eval_loss")
            self.evals_without_improvement = state.get("evals_without_improvement", 0)
            self.best_weights = weights

    def restore_best(self, model) -> None:
        if self.best_weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, self.best_weights)

    def stop_message(self, step: int) -> str:
        return (f"early stopping: eval_loss has not improved on step {self.best_step}'s "
                f"{self.best_eval_loss:.4f} for {self.patience} evaluations; stopping at step {step}")

    def summary(self, steps_trained: int, planned_steps: int) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "load_best_model_at_end": True,
            "best_step": self.best_step,
            "best_eval_loss": self.best_eval_loss,
            "stopped_early_at_step": steps_trained if steps_trained < planned_steps else None,
            "final_adapter": f"the adapter of step {self.best_step} (lowest eval_loss), "
                             f"not of the last step trained ({steps_trained})",
        }


def _adapter_weights(model) -> dict:
    """A CPU copy of the adapter's weights (read inside ``gathered_adapter``: whole under ZeRO-3)."""
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone().cpu() for key, value in get_peft_model_state_dict(model).items()}
