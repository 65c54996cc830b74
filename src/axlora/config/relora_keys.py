"""ReLoRA and jagged learning-rate restarts, under Axolotl's names (both its older and newer spellings).

Every ``jagged_restart_steps`` steps the learning rate restarts: it rises again from a small fraction over
``jagged_restart_warmup_steps`` (and may anneal over ``jagged_restart_anneal_steps`` before each restart). With
``relora: true`` each restart also merges the LoRA into the base weights (a quantized base is dequantized, added
to and quantized again), starts a fresh LoRA and prunes the optimizer state of the LoRA weights. Axolotl's older
``relora_steps`` / ``relora_warmup_steps`` / ``relora_anneal_steps`` mean the same with ``relora`` implied.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from axlora.config.base import StrictModel

RESTART_WARMUP_STEPS = 10
"""Axolotl's warm-up after a restart when none is set."""
RESTART_ANNEAL_STEPS = 1
"""Axolotl's anneal before a restart when none is set: 1 step leaves the rate untouched."""
PRUNE_RATIO = 0.9
"""Axolotl's share of optimizer state values zeroed at a restart (magnitude and random pruning)."""
RESET_PRUNE_RATIO = 0.999
"""Axolotl's share for ``relora_prune_method: reset`` (the paper's near-full reset)."""
_SPELLINGS = (("jagged_restart_steps", "relora_steps"), ("jagged_restart_warmup_steps", "relora_warmup_steps"),
              ("jagged_restart_anneal_steps", "relora_anneal_steps"))


class ReLoRASettings(StrictModel):
    """Restarts of the learning rate every N steps and, with ``relora``, merges of the LoRA into the base."""

    relora: bool | None = Field(
        default=None, description="ReLoRA: at every jagged restart merge the LoRA into the base weights, start a "
        "fresh LoRA and prune its optimizer state. Implied by relora_steps.",
    )
    jagged_restart_steps: int | None = Field(
        default=None, gt=0, description="Restart the learning rate every N optimizer steps (with relora: merge the "
        "LoRA there too).",
    )
    relora_steps: int | None = Field(
        default=None, gt=0, description="Axolotl's older spelling of jagged_restart_steps that also turns relora on.",
    )
    jagged_restart_warmup_steps: int | None = Field(
        default=None, ge=0, description=f"Steps over which the learning rate rises again after each restart "
        f"(default {RESTART_WARMUP_STEPS}).",
    )
    relora_warmup_steps: int | None = Field(
        default=None, ge=0, description="Axolotl's older spelling of jagged_restart_warmup_steps.",
    )
    jagged_restart_anneal_steps: int | None = Field(
        default=None, ge=0, description="Steps over which the learning rate falls before each restart (default "
        f"{RESTART_ANNEAL_STEPS}: no anneal).",
    )
    relora_anneal_steps: int | None = Field(
        default=None, ge=0, description="Axolotl's older spelling of jagged_restart_anneal_steps.",
    )
    relora_prune_ratio: float | None = Field(
        default=None, ge=0, le=1, description=f"Share of the LoRA's optimizer state values zeroed at each ReLoRA "
        f"restart (default {PRUNE_RATIO}; {RESET_PRUNE_RATIO} with relora_prune_method: reset).",
    )
    relora_prune_method: Literal["magnitude", "random", "reset"] | None = Field(
        default=None, description="Which optimizer state values a ReLoRA restart zeroes: magnitude (default: the "
        "smallest), random, or reset (random, near all).",
    )
    relora_cpu_offload: bool | None = Field(
        default=None, description="Do a ReLoRA merge's arithmetic in CPU memory (less GPU memory, slower).",
    )

    @model_validator(mode="after")
    def _check_restart_keys(self) -> ReLoRASettings:
        problems = []
        for new, old in _SPELLINGS:
            ours, theirs = getattr(self, new), getattr(self, old)
            if ours is not None and theirs is not None and ours != theirs:
                problems.append(f"{old} / {new}: two spellings of one setting with different values "
                                f"({theirs} and {ours}); keep one.")
        steps = self.restart_steps()
        if self.relora and steps is None:
            problems.append("relora: a ReLoRA restart happens every jagged_restart_steps (or relora_steps) steps; "
                            "set it.")
        if steps is None and (self.restart_warmup_steps(None) is not None or self.restart_anneal_steps(None)
                              is not None):
            problems.append("jagged_restart_warmup_steps / jagged_restart_anneal_steps: apply around restarts; set "
                            "jagged_restart_steps (or relora_steps).")
        if not self.merges_lora():
            pruning = [key for key in ("relora_prune_ratio", "relora_prune_method") if getattr(self, key) is not None]
            pruning += ["relora_cpu_offload"] if self.relora_cpu_offload else []
            if pruning:
                problems.append(f"{' / '.join(pruning)}: settings of ReLoRA's merges, which are off; set relora: true "
                                "(with jagged_restart_steps) or remove them.")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def restart_steps(self) -> int | None:
        """Steps between learning-rate restarts (None: no restarts)."""
        return _first_set(self.jagged_restart_steps, self.relora_steps, None)

    def restart_warmup_steps(self, default: int | None = RESTART_WARMUP_STEPS) -> int | None:
        return _first_set(self.jagged_restart_warmup_steps, self.relora_warmup_steps, default)

    def restart_anneal_steps(self, default: int | None = RESTART_ANNEAL_STEPS) -> int | None:
        return _first_set(self.jagged_restart_anneal_steps, self.relora_anneal_steps, default)

    def merges_lora(self) -> bool:
        """Whether restarts merge the LoRA into the base: ``relora: true``, or ``relora_steps`` with relora unset."""
        return bool(self.relora) or (self.relora is None and self.relora_steps is not None)

    def prune_ratio(self) -> float:
        if self.relora_prune_ratio is not None:
            return self.relora_prune_ratio
        return RESET_PRUNE_RATIO if self.relora_prune_method == "reset" else PRUNE_RATIO

    def relora_problems(self) -> list[str]:
        """What ReLoRA's merges cannot be combined with (``Config`` reports them; they read other sections)."""
        if self.restart_steps() is None:
            return []
        problems = []
        if getattr(self, "lr_scheduler", None) == "one_cycle":
            problems.append("jagged_restart_steps / lr_scheduler: restarts rescale a schedule step by step; "
                            "one_cycle is not one of those: use cosine, linear or constant.")
        if not self.merges_lora():
            return problems
        problems += self._merge_conflicts()
        optimizer = str(getattr(self, "optimizer", "adamw_torch"))
        if "adam" not in optimizer:
            problems.append(f"relora / optimizer: a restart prunes Adam's moment estimates; {optimizer} is not an "
                            "Adam optimizer (use adamw_torch, adamw_bnb_8bit, ...).")
        return problems

    def _merge_conflicts(self) -> list[str]:
        uses_fsdp = getattr(self, "uses_fsdp", None)
        problems = []
        if uses_fsdp is not None and uses_fsdp():
            problems.append("relora / fsdp: not together: the merge needs whole base weights on each process; "
                            "FSDP shards them.")
        refused = {
            "deepspeed": "the merge needs whole base weights and the optimizer state on each process",
            "rl": "the reference of preference tuning is the base without the adapter, which the merges change",
            "peft_use_dora": "DoRA's magnitude vector does not merge into the base as a restart does",
            "lora_target_parameters": "LoRA on parameters does not merge into the base as a restart does",
            "early_stopping_patience": "the best adapter belongs to the base of its time, which later merges change",
            "load_best_model_at_end": "the best adapter belongs to the base of its time, which later merges change",
        }
        for key, reason in refused.items():
            if getattr(self, key, None):
                problems.append(f"relora / {key}: not together: {reason}.")
        return problems


def _first_set(newer: int | None, older: int | None, default: int | None) -> int | None:
    """The newer spelling's value, else the older one's, else the default."""
    if newer is not None:
        return newer
    return older if older is not None else default
