"""The model ``axlora inference`` talks to: the base with the run's adapter, or the merged model; and the run's
tokenizer (saved beside the adapter or merged weights, with its chat template and added tokens).

Which adapter (first that applies): ``--lora_model_dir``, the run's ``output_dir/final``, then the adapter that
``lora_model_dir`` names. Every path and the adapter's base model are checked before weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.layout import RunLayout, is_adapter_dir
from axlora.model.adapter_choice import find_adapter, read_lora_config
from axlora.model.adapter_fit import (
    BaseModelFacts,
    adapter_module_shapes,
    base_facts_on_disk,
    check_base_model,
    loaded_weight_shapes,
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: an adapter on ``base_model``, or a merged model directory."""

    directory: Path
    merged: bool
    reason: str


def choose_source(config: Config, lora_model_dir: Path | None, merged: bool) -> ModelSource:
    """The adapter or merged model to load, and why; ``UserError`` naming what is missing."""
    layout = RunLayout(Path(config.output_dir))
    if merged:
        if not (layout.merged / "config.json").is_file():
            raise UserError(f"inference: --merged: {layout.merged} holds no merged model (config.json); "
                            "run axlora merge-lora on this config first, or drop --merged to load the adapter.")
        return ModelSource(layout.merged, True, f"the merged model {layout.merged}")
    if lora_model_dir is not None:
        adapter, _ = find_adapter(lora_model_dir.expanduser().resolve())
        return _checked_adapter(config, adapter, f"--lora_model_dir: the adapter in {adapter}")
    if is_adapter_dir(layout.final):
        return _checked_adapter(config, layout.final, f"the run's final adapter {layout.final}")
    if config.lora_model_dir:
        adapter, _ = find_adapter(Path(config.lora_model_dir))
        return _checked_adapter(config, adapter, f"lora_model_dir: the adapter in {adapter}")
    raise UserError(
        f"inference: no adapter to load: {layout.final} holds none (train this config first) and the config sets "
        "no lora_model_dir; pass --lora_model_dir DIR, or --merged for output_dir/merged."
    )


def _checked_adapter(config: Config, adapter_dir: Path, reason: str) -> ModelSource:
    """Refuse an adapter of another base model from the files alone, before any weights load."""
    adapter_config = read_lora_config(adapter_dir)
    base = base_facts_on_disk(config.base_model)
    if base is not None:
        check_base_model(config, adapter_dir, adapter_config, adapter_module_shapes(adapter_dir), base)
    return ModelSource(adapter_dir, False, reason)


def load_tokenizer_for(config: Config, source: ModelSource):
    """The tokenizer saved with the adapter or merged model; the config's tokenizer when none was saved."""
    from axlora.model.source import transformers_class
    from axlora.model.tokenizer import load_tokenizer

    if any((source.directory / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer_cls = transformers_class(config.tokenizer_type or "AutoTokenizer", "tokenizer_type")
        try:
            tokenizer = tokenizer_cls.from_pretrained(str(source.directory), trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"inference: cannot load the tokenizer saved in {source.directory}: {exc}") from None
    else:
        tokenizer = load_tokenizer(config, log=lambda _message: None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(config: Config, source: ModelSource, tokenizer, dtype, log: Log):
    """The model ready to generate: on the GPU when there is one, in ``dtype``, with the config's attention."""
    import torch

    from axlora.model.load import load_base_model

    # the loader's training-only switches off: checkpointing would also turn off the generation cache, and a
    # run with linearized Llama 4 experts saved its adapter for the standard (fused) model
    settings = {"gradient_checkpointing": False, "llama4_linearized_experts": False}
    if source.merged:
        settings.update(base_model=str(source.directory), revision_of_model=None)
    model = load_base_model(config.model_copy(update=settings), dtype, tokenizer=tokenizer, log=log)
    if not source.merged:
        model = _attach(model, config, source.directory, log)
    if not config.quantization_bits():  # quantized weights are placed on the GPU as they load
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model


def _attach(model, config: Config, adapter_dir: Path, log: Log):
    """The adapter on the loaded base, checked against it first (what a Hub base's files could not tell)."""
    from peft import PeftModel

    base = BaseModelFacts(names=[config.base_model, getattr(model, "name_or_path", "") or ""],
                          weight_shapes=loaded_weight_shapes(model), complete=True)
    for warning in check_base_model(config, adapter_dir, read_lora_config(adapter_dir),
                                    adapter_module_shapes(adapter_dir), base):
        log(f"warning: {warning}")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"inference: cannot load the adapter in {adapter_dir} onto base_model "
                        f"'{config.base_model}': {str(exc).splitlines()[0]}") from None
