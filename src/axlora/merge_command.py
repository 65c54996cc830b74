"""``axlora merge-lora``: pick the adapter the run produced and merge it with the streamed merger.

Which adapter (first that applies): ``--lora-model-dir``, the run's ``output_dir/final``, then the
adapter that ``lora_model_dir`` names. The merged model takes the tokenizer saved with the adapter (the
run's tokenizer, with any added tokens and chat template), falling back to the base model's.
"""

from __future__ import annotations

from pathlib import Path

from axlora.config.block_diffusion_keys import refuse_merge
from axlora.config.schema import Config
from axlora.core.atomic import recover_directory
from axlora.core.errors import RunFailed, UserError
from axlora.core.layout import RunLayout, is_adapter_dir
from axlora.model.adapter_choice import find_adapter
from axlora.model.source import resolve_base_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def choose_adapter(config: Config, lora_model_dir: str | None, log=print) -> tuple[Path, str]:
    """The adapter to merge and why it was chosen."""
    if lora_model_dir:
        adapter, reason = find_adapter(Path(lora_model_dir).expanduser().resolve())
        return adapter, f"--lora-model-dir: {reason}"
    final = RunLayout(Path(config.output_dir)).final
    recover_directory(final, log)  # a replacement of final/ killed half way left it hidden
    if is_adapter_dir(final):
        return final, f"the run's final adapter {final}"
    if config.lora_model_dir:
        adapter, reason = find_adapter(Path(config.lora_model_dir))
        return adapter, f"lora_model_dir: {reason}"
    raise UserError(
        f"merge-lora: nothing to merge: {final} holds no adapter (train first) and the config sets no "
        "lora_model_dir; pass --lora-model-dir DIR to merge another adapter."
    )


def run_merge(config: Config, *, lora_model_dir: str | None, output: str | None, dtype: str | None,
              verify: bool, log=print) -> Path:
    from axlora.merge import MergeVerificationError, merge_lora

    refuse_merge(config.block_diffusion)
    adapter_dir, reason = choose_adapter(config, lora_model_dir, log)
    log(f"merge-lora: merging {reason}")
    output_dir = Path(output).expanduser().resolve() if output else RunLayout(Path(config.output_dir)).merged
    tokenizer_dir = adapter_dir if any((adapter_dir / n).is_file() for n in _TOKENIZER_FILES) else None
    try:
        report = merge_lora(
            resolve_base_model(config.base_model), adapter_dir, output_dir,
            dtype=dtype, verify=verify, tokenizer_dir=tokenizer_dir, log=log,
        )
    except MergeVerificationError as exc:
        raise RunFailed(f"merge-lora: verification failed, nothing was written: {exc}") from None
    log(f"merge-lora: wrote {report.output_dir}")
    return report.output_dir

