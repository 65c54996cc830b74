"""ReLoRA (Lialin et al., 2023, as Axolotl runs it): every ``jagged_restart_steps`` steps, merge the LoRA into the
base weights, start a fresh LoRA and prune its optimizer state; the learning rate restarts (``relora_schedule``).

What the run saves. Each restart's LoRA factors are recorded (``Merge``). A checkpoint carries them
(``relora_merges.safetensors``) beside its adapter, and a resumed run replays them onto the freshly loaded base
before its first step, so it continues on the very weights the interrupted run had. ``final/`` holds one plain
peft adapter that is the whole result: the recorded factors and the last LoRA side by side (rank r x (restarts +
1), alpha scaled so every part keeps its scale). Loaded on the original ``base_model`` it gives base + every merge
+ the last LoRA, so ``merge-lora``, ``inference`` and continuing from the output dir (``lora_model_dir``) need
nothing else; the base on disk is never rewritten. On a quantized base the run trained on the merged weights
quantized again, so its own forward differs from that adapter's by the rounding of 4-bit (or 8-bit) weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.train import checkpoint as ckpt
from axlora.train.relora_merge import Factors, current_factors, lora_layers, merge_into_base, reinitialise
from axlora.train.relora_optim import prune_optimizer_state

MERGES_FILE = "relora_merges.safetensors"
"""The LoRA factors of every restart so far, in each checkpoint of a ReLoRA run."""


@dataclass
class Merge:
    """One restart: the step after which it happened and each layer's LoRA as it was merged."""

    step: int
    layers: dict[str, Factors]


@dataclass
class ReLoRA:
    """The restarts of one run: makes them, records them, saves and replays them."""

    config: Config
    peft_model: Any
    say: Callable[[str], None] = print
    history: list[Merge] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.adapter = self.peft_model.active_adapter
        self.layers = lora_layers(self.peft_model)
        self.every = self.config.restart_steps()
        self.lora_params = [p for name, p in self.peft_model.named_parameters() if p.requires_grad and "lora_" in name]

    def after_step(self, done: int, total: int, optimizer) -> None:
        """Restart after every ``jagged_restart_steps``-th step, except after the last step (nothing follows it)."""
        if done % self.every == 0 and done < total:
            self.restart(done, optimizer)

    def restart(self, step: int, optimizer) -> None:
        import torch

        generator = torch.Generator().manual_seed(self.config.seed * 2**20 + step)
        merged = {}
        for name, layer in self.layers.items():
            merged[name] = current_factors(layer, self.adapter)
            merge_into_base(layer, merged[name], bool(self.config.relora_cpu_offload))
            reinitialise(layer, self.adapter, generator)
        zeroed, total = prune_optimizer_state(optimizer, self.lora_params, self.config.prune_ratio(),
                                              self.config.relora_prune_method or "magnitude", generator)
        self.history.append(Merge(step, merged))
        share = f"{100 * zeroed / total:.1f}%" if total else "no"
        self.say(f"relora: restart {len(self.history)} after step {step}: merged the LoRA of {len(merged)} layers "
                 f"into the base, started a fresh LoRA, zeroed {share} of its optimizer state")

    # ---- on disk ------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Every restart's factors, into a checkpoint being written."""
        from safetensors.torch import save_file

        tensors, merges = {}, []
        for index, merge in enumerate(self.history):
            for name, factors in merge.layers.items():
                tensors[f"{index}/{name}/A"] = factors.lora_a.contiguous()
                tensors[f"{index}/{name}/B"] = factors.lora_b.contiguous()
            merges.append({"step": merge.step, "layers": {name: [f.scale, f.fan_in_fan_out]
                                                          for name, f in merge.layers.items()}})
        save_file(tensors, str(directory / MERGES_FILE),
                  metadata={"restart_steps": str(self.every), "merges": json.dumps(merges)})

    def replay(self, checkpoint: Path) -> None:
        """The checkpoint's merges onto this (freshly loaded) base, in order, exactly as they were made."""
        self.history = read_merges(checkpoint, self.every)
        for merge in self.history:
            if merge.layers.keys() != self.layers.keys():
                raise UserError(f"resume_from_checkpoint: {checkpoint / MERGES_FILE} merged other layers than this "
                                "run's LoRA has; was it written with other lora_target_modules?")
            for name, layer in self.layers.items():
                merge_into_base(layer, merge.layers[name], bool(self.config.relora_cpu_offload))
        if self.history:
            self.say(f"relora: replayed the checkpoint's {len(self.history)} merge(s) into the base weights")


def read_merges(checkpoint: Path, restart_steps: int | None) -> list[Merge]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / MERGES_FILE), framework="pt") as saved:
        metadata = saved.metadata() or {}
        if restart_steps is not None and metadata.get("restart_steps") != str(restart_steps):
            raise UserError(f"resume_from_checkpoint: {checkpoint} restarted every {metadata.get('restart_steps')} "
                            f"steps, this run every {restart_steps} (jagged_restart_steps / relora_steps); a resume "
                            "replays the run exactly, so they must match.")
        history = []
        for index, merge in enumerate(json.loads(metadata.get("merges", "[]"))):
            layers = {name: Factors(saved.get_tensor(f"{index}/{name}/A"), saved.get_tensor(f"{index}/{name}/B"),
                                    scale, fan_in_fan_out)
                      for name, (scale, fan_in_fan_out) in merge["layers"].items()}
            history.append(Merge(merge["step"], layers))
    return history


def start_relora(config: Config, peft_model, checkpoint: Path | None, resumed_step: int,
                 say: Callable[[str], None] = print) -> ReLoRA | None:
    """The run's ReLoRA (None when restarts do not merge), with a resumed checkpoint's merges replayed.

    Call it once the model sits where it trains (after wrapping), so a replay computes on the same device.
    """
    saved = checkpoint is not None and (checkpoint / MERGES_FILE).is_file()
    if not config.merges_lora():
        if saved and read_merges(checkpoint, None):
            raise UserError(f"resume_from_checkpoint: {checkpoint} was trained with ReLoRA merges in its base "
                            "weights; resume it with the same relora settings.")
        return None
    relora = ReLoRA(config, peft_model, say)
    if checkpoint is not None and saved:
        relora.replay(checkpoint)
    elif checkpoint is not None and resumed_step >= (relora.every or 0):
        raise UserError(f"resume_from_checkpoint: {checkpoint} holds no ReLoRA merges ({MERGES_FILE}), yet this run "
                        f"would have merged by step {resumed_step}: it was written without relora; resume it "
                        "without relora, or start afresh.")
    return relora


def save_run_adapter(peft_model, directory: Path, relora: ReLoRA | None) -> None:
    """A checkpoint's adapter, and with ReLoRA the merges its base weights hold."""
    ckpt.save_adapter(peft_model, directory)
    if relora is not None:
        relora.save(directory)


@contextmanager
def cumulative_adapter(relora: ReLoRA | None, peft_model) -> Iterator[None]:
    """While inside, the LoRA holds every restart's factors beside its own, as ``final/`` saves it.

    Side by side, B = [B1 .. Bk B] and A = [A1; ..; Ak; A] give B @ A = sum of the parts: rank and alpha grow by
    the same factor (alpha by its square root under rsLoRA), which keeps the scale, and a part merged at another
    scale has its B rescaled. The model's own LoRA is put back on the way out.
    """
    if relora is None or not relora.history:
        yield
        return
    import torch

    parts = len(relora.history) + 1
    adapter, lora_config = relora.adapter, peft_model.peft_config[relora.adapter]
    kept = {name: (layer.lora_A[adapter].weight.data, layer.lora_B[adapter].weight.data)
            for name, layer in relora.layers.items()}
    settings = {key: getattr(lora_config, key) for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
    try:
        for name, layer in relora.layers.items():
            a, b = kept[name]
            scale = float(layer.scaling[adapter])
            merged = [merge.layers[name] for merge in relora.history]
            layer.lora_A[adapter].weight.data = torch.cat([f.lora_a.to(a) for f in merged] + [a], dim=0)
            layer.lora_B[adapter].weight.data = torch.cat(
                [f.lora_b.to(b) * (f.scale / scale) for f in merged] + [b], dim=1)
        _grow(lora_config, parts)
        relora.say(f"relora: final/ holds the LoRA with its {parts - 1} merged restart(s) beside it "
                   f"(rank {lora_config.r}), for the original base_model")
        yield
    finally:
        for name, layer in relora.layers.items():
            layer.lora_A[adapter].weight.data, layer.lora_B[adapter].weight.data = kept[name]
        for key, value in settings.items():
            setattr(lora_config, key, value)


def _grow(lora_config, parts: int) -> None:
    """Rank x parts; alpha x parts (x sqrt(parts) under rsLoRA): alpha / r (or / sqrt(r)) stays the same."""
    alpha_factor = math.sqrt(parts) if lora_config.use_rslora else parts
    lora_config.r = lora_config.r * parts
    lora_config.lora_alpha = lora_config.lora_alpha * alpha_factor
    lora_config.rank_pattern = {key: value * parts for key, value in (lora_config.rank_pattern or {}).items()}
    lora_config.alpha_pattern = {key: value * alpha_factor for key, value in (lora_config.alpha_pattern or {}).items()}
