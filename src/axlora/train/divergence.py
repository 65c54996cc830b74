"""A diverged run stops at the step it diverged, before anything non-finite is written.

After every optimizer step the loss, the gradient norm and the trainable weights are checked. A non-finite
loss or weight always stops the run. A non-finite gradient norm stops it too, except under fp16, where the
loss scaler skips such a step and lowers its scale (that is how fp16 training finds its scale; the weights
stay as they were, and a scale that never recovers shows up as a non-finite loss soon after). The check on
the weights is one reduction over the adapter's tensors: cheap next to a step. Saving also refuses
non-finite tensors (``require_finite``), so neither a checkpoint nor ``final/`` can hold one.
"""

from __future__ import annotations

import math

from axlora.core.errors import RunFailed


class Diverged(RunFailed):
    """Training produced non-finite numbers: exit status 1, nothing of the diverged steps on disk."""


def check_step(loss: float, grad_norm: float | None, step: int, weights_finite: bool, precision: str,
               learning_rate: float) -> None:
    """Raise ``Diverged`` naming ``step`` when its figures or the weights after it are not finite.

    ``grad_norm`` is None when the step did not measure it (no clipping).
    """
    grads_ok = grad_norm is None or math.isfinite(grad_norm) or precision == "fp16"
    if math.isfinite(loss) and weights_finite and grads_ok:
        return
    if not math.isfinite(loss):
        what = f"the loss is {loss}"
    elif not weights_finite:
        what = "the adapter's weights became non-finite"
    else:
        what = f"the gradient norm is {grad_norm}"
    raise Diverged(f"training diverged at step {step}: {what}. The run stops here; nothing of this step was saved "
                   "(checkpoints hold earlier steps, an earlier final/ is untouched).\n"
                   + _likely_causes(precision, learning_rate))


def _likely_causes(precision: str, learning_rate: float) -> str:
    causes = [f"the learning rate is too high (learning_rate: {learning_rate:g}; try a tenth of it, or "
              "warmup_steps)"]
    if precision == "fp16":
        causes.append("fp16 overflow: float16 cannot hold large activations; use bf16 where the GPU supports it")
    causes.append("bad data: rows with extreme lengths or unusual tokens (axlora preprocess prints a report); "
                  "max_grad_norm limits the damage of a bad batch")
    return "Likely causes:\n" + "\n".join(f"  - {cause}" for cause in causes)


def weights_finite(model) -> bool:
    """Whether every trainable tensor of ``model`` on this process is finite (one device sync)."""
    import torch

    checks = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad and p.numel()]
    return bool(torch.stack(checks).all()) if checks else True


def require_finite(state: dict, where: str) -> None:
    """Refuse to write tensors holding NaN or infinity (the last guard before the disk)."""
    import torch

    bad = [name for name, tensor in state.items()
           if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise Diverged(f"{where}: refusing to save an adapter with non-finite weights ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}); training diverged.")
