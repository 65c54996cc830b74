"""Pruning the LoRA's optimizer state at a ReLoRA restart, as Axolotl does.

The moment estimates of the old LoRA would steer the fresh one, so most of them are zeroed: ``magnitude`` zeroes
the values at or below the ``ratio`` quantile of their magnitudes, ``random`` and ``reset`` a random share
``ratio`` of them. Every per-weight state tensor is pruned (Adam's two moments). bitsandbytes' 8-bit optimizers
keep them as codes into a 256-value map with one scale per block of 256 values: the values are read through the
map to choose, and the chosen codes are set to the map's zero, so the values kept are bit for bit the same.
"""

from __future__ import annotations

from typing import Any

BNB_STATE_BLOCK = 256
"""Values per scale in bitsandbytes' blockwise 8-bit optimizer state."""


def prune_optimizer_state(optimizer, params, ratio: float, method: str, generator) -> tuple[int, int]:
    """Zero a share of the state of ``params`` in place; returns (values zeroed, values in all)."""
    state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the optimizer
    zeroed = total = 0
    for param in params:
        per_param = state.get(param) or {}
        for key, value in per_param.items():
            if not _is_tensor(value) or value.shape != param.shape:
                continue
            values = _read(per_param, key, value)
            drop = _chosen(values, ratio, method, generator)
            _zero(per_param, key, value, drop)
            zeroed += int(drop.sum())
            total += value.numel()
    return zeroed, total


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _read(per_param: dict, key: str, value):
    """The state's values as floats (8-bit codes read through their map and block scales)."""
    import torch

    if value.is_floating_point():
        return value.float()
    code_map, scales = _code_map(per_param, key)
    blocks = scales.float().repeat_interleave(BNB_STATE_BLOCK)[: value.numel()].view(value.shape)
    return code_map.float()[value.long()] * blocks.to(torch.float32)


def _code_map(per_param: dict, key: str):
    suffix = key.removeprefix("state")
    code_map, scales = per_param.get(f"qmap{suffix}"), per_param.get(f"absmax{suffix}")
    if code_map is None or scales is None:
        raise RuntimeError(f"relora: optimizer state '{key}' is {per_param[key].dtype}, not a bitsandbytes 8-bit state")
    return code_map, scales


def _chosen(values, ratio: float, method: str, generator):
    """The values to zero: the smallest by magnitude, or a random share."""
    import torch

    if method == "magnitude":
        magnitude = values.abs().flatten()
        return values.abs() <= _quantile(magnitude, ratio)
    draws = torch.rand(values.shape, generator=generator)
    return (draws < ratio).to(values.device)


def _quantile(flat, q: float):
    """``torch.quantile`` (linear interpolation) without its limit on the tensor's size."""
    position = q * (flat.numel() - 1)
    lower, upper = int(position), min(int(position) + 1, flat.numel() - 1)
    low = flat.kthvalue(lower + 1).values
    high = flat.kthvalue(upper + 1).values
    return low + (high - low) * (position - lower)


def _zero(per_param: dict, key: str, value, drop) -> None:
    if value.is_floating_point():
        value.masked_fill_(drop, 0)
        return
    code_map, _ = _code_map(per_param, key)
    zero_code = int(code_map.abs().argmin())
    if float(code_map[zero_code]) != 0.0:
        raise RuntimeError(f"relora: the code map of optimizer state '{key}' has no zero")
    value.masked_fill_(drop, zero_code)
