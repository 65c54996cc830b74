"""DeepSpeed ZeRO presets shipped with axlora (JSON), read by ``axlora.deepspeed_config``."""
