"""The names the ``deepspeed`` key accepts besides a JSON path: axlora's shipped ZeRO presets (the JSON files in
``axlora/deepspeed_configs``) and the file names of Axolotl's, which map onto them."""

PRESETS = ("zero1", "zero2", "zero3", "zero3_offload")

# Axolotl configs name the JSON files its repository ships; the same settings are our presets.
AXOLOTL_FILES = {
    "zero1.json": "zero1", "zero1_torch_compile.json": "zero1", "zero2.json": "zero2", "zero3.json": "zero3",
    "zero3_bf16.json": "zero3", "zero3_bf16_cpuoffload_all.json": "zero3_offload",
    "zero3_bf16_cpuoffload_params.json": "zero3_offload",
}
