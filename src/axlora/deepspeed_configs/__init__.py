"""DeepSpeed ZeRO presets shipped with axlora (JSON), named in ``config.deepspeed_presets`` and read by ``train.deepspeed``."""
