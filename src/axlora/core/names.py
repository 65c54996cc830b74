"""Names that more than one layer writes or reads: file names of the formats axlora shares with peft and
transformers, and the label value that masks a token out of the loss."""

IGNORE_INDEX = -100
"""The label of a token that is not trained (prompt, padding): PyTorch's cross-entropy skips it."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
"""peft's adapter files: its config, and its weights (safetensors; older adapters: a torch ``.bin``)."""

PEFT_PREFIX = "base_model.model."
"""What peft puts before a base module's path in an adapter's weight names."""

MERGE_MARKER = "axlora_merge.json"
"""Written into every merged model: marks it as merge-lora's output (a base for a fresh LoRA, safe to replace)."""

RESOLVED_CONFIG = "axlora.yml"
"""The config as a run used it, saved beside its adapters."""

BUILTIN_MODEL_PREFIX = "axlora:"
"""``base_model: axlora:<name>`` names a model axlora builds itself (the offline demo)."""


def is_builtin_model(name: str) -> bool:
    return name.startswith(BUILTIN_MODEL_PREFIX)
