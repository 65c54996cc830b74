"""Which layout a Llama 4 checkpoint stores its routed experts in, and building the model in that layout.

transformers saves the experts fused (``experts.gate_up_proj`` / ``experts.down_proj``); Axolotl's Llama 4 copies
(``axolotl-quants/Llama-4-*-Linearized-*``, some of them already 4-bit) save one linear layer per expert and
projection (``experts.gate_projs.3.weight``). The standard model has no place for the latter: loading them into it
would leave every expert at its random initialization. For such a checkpoint the model is built with linearized
experts from the start, so ``from_pretrained`` loads (and, for a 4-bit checkpoint, dequantizes on use) each expert's
weights into its own layer, exactly as for any other linear layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from axlora.core.errors import UserError
from axlora.core.safetensors_header import read_header
from axlora.model.llama4_experts import PROJECTIONS, LinearizedLlama4Experts

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def holds_linearized_experts(source: str, revision: str | None = None) -> bool:
    """Whether the checkpoint at ``source`` (a directory or Hub id) stores its experts one linear layer each."""
    return any(_is_linearized_expert(name) for name in _weight_names(source, revision))


def _is_linearized_expert(name: str) -> bool:
    return any(f".experts.{projection}." in name for projection in PROJECTIONS)


def _weight_names(source: str, revision: str | None) -> list[str]:
    """The tensor names of the checkpoint, from its shard index or its single safetensors file's header."""
    index = _checkpoint_file(source, WEIGHTS_INDEX, revision)
    if index is not None:
        return list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = _checkpoint_file(source, WEIGHTS_FILE, revision)
    if single is None:
        raise UserError(f"llama4_linearized_experts: found no safetensors weights ({WEIGHTS_INDEX} or "
                        f"{WEIGHTS_FILE}) of base_model '{source}' to tell the layout of its experts from: the "
                        "checkpoint is not in safetensors format, or (a Hub id) not downloaded and the Hub unreachable.")
    return [tensor.name for tensor in read_header(single)[0]]


def _checkpoint_file(source: str, name: str, revision: str | None) -> Path | None:
    """A file of the checkpoint, from its directory or the Hub cache (fetched as ``from_pretrained`` would)."""
    local = Path(source)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


@contextmanager
def built_linearized() -> Iterator[None]:
    """While open, Llama 4 models are built with linearized experts.

    transformers creates each MoE layer's experts inside ``Llama4TextMoe.__init__`` from the class named
    ``Llama4TextExperts`` in its modeling module, and offers no other way to choose it; building the model with
    per-expert layers before the weights load is the only way to load a linearized (or pre-quantized) checkpoint
    as it is stored. The name is restored on leaving, whatever happens.
    """
    from transformers.models.llama4 import modeling_llama4

    standard = modeling_llama4.Llama4TextExperts
    modeling_llama4.Llama4TextExperts = _BuildLinearized
    try:
        yield
    finally:
        modeling_llama4.Llama4TextExperts = standard


class _BuildLinearized:
    """What ``Llama4TextExperts(config)`` makes while ``built_linearized`` is open. A class, as transformers also
    tests modules against the name (to initialize fused experts); no module is an instance of it."""

    def __new__(cls, config) -> LinearizedLlama4Experts:  # type: ignore[misc]
        return LinearizedLlama4Experts.from_config(config)


def refuse_unloaded_experts(base_model: str, loading: dict) -> None:
    """No expert may keep its random initialization: a checkpoint missing some experts' weights is refused."""
    unloaded = [key for key in loading.get("missing_keys", []) if ".experts." in key]
    if unloaded:
        raise UserError(f"llama4_linearized_experts: base_model '{base_model}' stores linearized experts but not "
                        f"all of them ({len(unloaded)} weights missing, e.g. {sorted(unloaded)[0]}); the checkpoint "
                        "is incomplete.")


def load_llama4(model_cls, source: str, kwargs: dict, base_model: str):
    """``from_pretrained`` in the layout the checkpoint stores its experts in; refused when any expert is left
    unloaded."""
    if holds_linearized_experts(source, kwargs.get("revision")):
        with built_linearized():
            model, loading = model_cls.from_pretrained(source, output_loading_info=True, **kwargs)
    else:
        model, loading = model_cls.from_pretrained(source, output_loading_info=True, **kwargs)
    refuse_unloaded_experts(base_model, loading)
    return model
