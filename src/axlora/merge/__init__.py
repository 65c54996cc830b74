"""Streamed, self-verifying merge of a peft LoRA adapter into its base model (``axlora merge-lora``).

The merge never holds the model in memory: it reads the base's safetensors shards one tensor at a time, adds
the LoRA delta in fp32 (expert by expert for LoRA on fused MoE expert parameters), checks each merged weight
against base + adapter on random probes, and publishes the result atomically (a temporary sibling directory
renamed into place).
"""

from axlora.merge.core import MergeReport, MergeVerificationError, merge_lora

__all__ = ["MergeReport", "MergeVerificationError", "merge_lora"]
