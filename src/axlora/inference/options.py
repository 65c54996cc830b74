"""What ``axlora inference`` was asked to do, beyond the config: where the model comes from, the prompts,
how to sample. Checked here, before any model loads, so a contradiction costs a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from axlora.core.errors import UserError
from axlora.model.generate import Sampling


@dataclass(frozen=True)
class InferenceOptions:
    """The command's own flags (the config's keys come as ``--key value`` overrides)."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: Path | None = None
    output: str | None = None
    """A JSON Lines file to write, or ``-`` for standard output."""
    system: str | None = None
    lora_model_dir: Path | None = None
    merged: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    batch_size: int = 8
    gradio: bool = False

    def check(self) -> None:
        """Refuse flags that contradict each other or cannot mean anything."""
        if self.merged and self.lora_model_dir is not None:
            raise UserError("inference: --merged loads output_dir/merged, which holds no adapter; "
                            "drop --lora_model_dir or --merged.")
        if self.prompts and self.prompts_file is not None:
            raise UserError("inference: give prompts with --prompt or with --prompts FILE, not both.")
        if self.gradio and (self.prompts or self.prompts_file or self.output):
            raise UserError("inference: --gradio is a web chat; it takes no --prompt, --prompts or --output.")
        sampling = self.sampling
        if sampling.max_new_tokens < 1:
            raise UserError(f"inference: --max-new-tokens must be at least 1, got {sampling.max_new_tokens}.")
        if sampling.temperature < 0:
            raise UserError(f"inference: --temperature must be 0 (greedy) or more, got {sampling.temperature:g}.")
        if sampling.temperature == 0 and (sampling.top_p is not None or sampling.top_k is not None):
            raise UserError("inference: --top-p and --top-k filter sampled tokens; they need --temperature above 0 "
                            "(the default, 0, is greedy).")
        if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
            raise UserError(f"inference: --top-p must be in (0, 1], got {sampling.top_p:g}.")
        if sampling.top_k is not None and sampling.top_k < 1:
            raise UserError(f"inference: --top-k must be at least 1, got {sampling.top_k}.")
        if sampling.repetition_penalty is not None and sampling.repetition_penalty <= 0:
            raise UserError(f"inference: --repetition-penalty must be above 0, got {sampling.repetition_penalty:g}.")
        if self.batch_size < 1:
            raise UserError(f"inference: --batch-size must be at least 1, got {self.batch_size}.")
