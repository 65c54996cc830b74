"""Axolotl's config keys that are not axlora settings: renamed, accepted with no effect, or rejected.

Every key of the schema (``config/schema.py`` and its sections) is supported with Axolotl's meaning. This module covers
the rest of Axolotl's documented options, so an Axolotl YAML either runs or gets one line per key saying
why not, instead of Axolotl's habit of dropping what it does not know:

* ``RENAMED``: Axolotl spellings of axlora keys (``model_config`` -> ``overrides_of_model_config``).
* ``NO_OP``: keys that cannot change what a LoRA run trains (debug output, kernel patches that only
  change speed, internal bookkeeping). They are accepted, and each one set prints a note saying why it
  has no effect.
* ``REJECTED``: features axlora does not have (RL, multimodal, full fine-tuning, ...). A value that asks
  for nothing (``false``, ``0``, empty) is accepted, because Axolotl files often list such keys switched
  off; any other value is an error naming the key and the reason.
* ``PLUGINS``: entries of Axolotl's ``plugins:`` list, by class name.
* ``VALUE_HINTS``: Axolotl-only values of supported keys (``gradient_checkpointing: offload``).

A key that is both in the schema and in a table is a schema key: the schema always wins, so a feature
added to axlora later only needs its field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def asks_for_nothing(value: Any, data: dict[str, Any] | None = None) -> bool:
    """``false``, ``0``, an empty string/list/mapping, or ``"false"``/``"none"``: the feature stays off."""
    return not value or (isinstance(value, str) and value.strip().lower() in {"false", "no", "none"})


@dataclass(frozen=True)
class NoOp:
    """An Axolotl key that is accepted and has no effect on a LoRA run, and why."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    """An Axolotl feature axlora does not have; ``accepts`` says which values ask for nothing."""

    reason: str
    accepts: Callable[[Any, dict[str, Any]], bool] = asks_for_nothing
    accepted: str = "false or empty"


@dataclass(frozen=True)
class Plugin:
    """An Axolotl plugin: what it does, whether it only changes speed/memory, and axlora's equivalent."""

    what: str
    speed_only: bool
    equivalent: str | None = None
    sets: str | None = None  # the axlora switch the plugin turns on (unless the config sets it)


RENAMED: dict[str, str] = {
    "model_config": "overrides_of_model_config",
    "model_revision": "revision_of_model",
    "type_of_model": "model_type",
    "evaluation_strategy": "eval_strategy",
    "dpo_beta": "rl_beta",
    "noisy_embedding_alpha": "neftune_noise_alpha",
}
"""Axolotl spellings (aliases and deprecated names) -> the axlora key with the same meaning."""

TRANSLATED: dict[str, str] = {
    "auto_resume_from_checkpoints": "true is read as resume_from_checkpoint: auto (the same behaviour)",
}
"""Axolotl keys whose value becomes another axlora setting, and how."""


def _noop(reason: str, *keys: str) -> dict[str, NoOp]:
    return {key: NoOp(reason) for key in keys}


def _rejected(reason: str, *keys: str) -> dict[str, Rejected]:
    return {key: Rejected(reason) for key in keys}


_SPEED = "a kernel or patch that changes speed or memory only, not what is trained"

NO_OP: dict[str, NoOp] = {
    **_noop("Axolotl's debug printing of tokenized rows; `axlora preprocess` prints a data report instead", "debug"),
    **_noop("set by the launcher (accelerate/torchrun), not by the config", "local_rank", "world_size", "device", "ddp"),
    **_noop(
        "internal Axolotl flags; axlora reads the architecture from the model's config",
        "is_falcon_derived_model", "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model",
        "axolotl_config_path", "is_preprocess", "preprocess_iterable", "experimental_skip_move_to_device",
    ),
    **_noop(
        "tuning of Axolotl's packer; axlora packs every sample at once and reports the fill",
        "total_num_tokens", "total_supervised_tokens", "sample_packing_eff_est", "sample_packing_group_size",
        "sample_packing_bin_size", "sample_packing_sequentially", "sample_packing_mp_start_method",
        "multipack_real_batches",
    ),
    **_noop(
        "axlora evaluates unpacked rows, so eval_loss is the same with or without packing; only eval speed differs",
        "eval_sample_packing",
    ),
    **_noop("eval loss does not depend on the eval batch; axlora evaluates with micro_batch_size", "eval_batch_size"),
    **_noop(
        "Axolotl's sample generations; axlora prints sample_prompts completed before and after training",
        "generate_samples", "num_generation_samples",
        "generation_max_new_tokens", "generation_temperature", "generation_top_p", "generation_top_k",
        "generation_prompt_ratio", "generation_do_sample",
    ),
    **_noop(
        "Axolotl aborts when the loss explodes; axlora logs the loss and leaves stopping to you",
        "loss_watchdog_threshold", "loss_watchdog_patience",
    ),
    **_noop("axlora always logs tokens per second", "include_tokens_per_second", "include_tkps"),
    **_noop(
        "Axolotl's SwanLab completion table is filled only from trainer log entries (dpo/prompt, ...) that its "
        "trainers never write, so it stays empty; axlora's SwanLab run gets the metrics and eval_table_size's table",
        "swanlab_log_completions", "swanlab_completion_log_interval", "swanlab_completion_max_buffer",
    ),
    **_noop("axlora always writes TensorBoard events to output_dir/logs/tensorboard", "use_tensorboard"),
    **_noop(
        "data-loading speed only; axlora's rows are tokenized in memory",
        "dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor", "dataset_keep_in_memory",
        "dataset_processes", "dataset_num_proc", "remove_unused_columns",
    ),
    **_noop("transformers always loads weights with low memory use", "low_cpu_mem_usage"),
    **_noop(
        _SPEED,
        "flash_attn_cross_entropy", "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp",
        "flash_optimum", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel",
        "unsloth_cross_entropy_loss", "unsloth_lora_mlp", "unsloth_lora_qkv", "unsloth_lora_o", "unsloth_rms_norm",
        "unsloth_rope",
        "use_scattermoe", "use_sonicmoe", "experts_implementation", "torch_compile", "torch_compile_backend",
        "torch_compile_mode", "batch_flattening", "tiled_mlp", "tiled_mlp_num_shards", "tiled_mlp_use_original_mlp",
        "flex_attn_compile_kwargs", "embeddings_skip_upcast", "gc_steps",
    ),
    **_noop(
        "Axolotl's Triton/CUDA MoE kernels (grouped or persistent expert GEMMs, DeepSeek-V4 attention/RoPE/mHC, "
        "the fp4 grouped expert GEMM) ship with Axolotl only; the model's own expert and attention code runs, "
        "with activations in the compute dtype (the same math; dsv4_fp4_grouped_mode: nvfp4 would round "
        "activations to fp4)",
        "moe_kernels", "moe_group_size", "moe_persistent_kernel", "use_dsv4_kernels", "dsv4_fp4_grouped_mode",
    ),
    **_noop(
        "tuning of Cut Cross-Entropy's kernel (cut_cross_entropy): the same loss",
        "cut_cross_entropy_accum_c_fp32", "cut_cross_entropy_c_grad_chunk_size",
    ),
    **_noop(
        "DDP tuning; axlora sets up data parallelism itself",
        "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters",
    ),
    **_noop("profiling output only; use torch.profiler around `axlora train`", "profiler_steps", "profiler_steps_start"),
    **_noop("tokenizer files are saved as transformers writes them", "tokenizer_save_jinja_files"),
    **_noop("transformers downloads only the weight files it needs", "base_model_ignore_patterns"),
    **_noop("huggingface_hub uses your login or HF_TOKEN on its own", "hf_use_auth_token"),
    **_noop("settings of Axolotl's merge command; use `axlora merge-lora`", "merge_lora", "merge_method", "lora_on_cpu"),
    **_noop("settings of Axolotl's Gradio inference UI, not of training", "gradio_title", "gradio_share",
            "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens", "gradio_temperature"),
    **_noop("used only with use_eaft, which axlora does not support", "eaft_alpha", "eaft_k"),
    **_noop("axlora applies sequence_len to the prompt with each answer; the prompt is not cut on its own",
            "max_prompt_len"),
    **_noop("a speed/memory switch of TRL's DPO trainer; axlora batches chosen and rejected itself",
            "dpo_use_liger_kernel", "dpo_padding_free", "dpo_use_logits_to_keep"),
    **_noop("axlora's torch import is not configurable", "torchdistx_path"),
    **_noop("axlora always writes a whole adapter (it is never sharded)", "fsdp_final_state_dict_type"),
}

_RL = ("axlora does offline preference tuning (rl: dpo, ipo, simpo, orpo, kto); online RL that generates answers "
       "during training (GRPO, reward models, vLLM) is not supported")
_RL_EXTRAS = "a preference-tuning option axlora does not have (rl_beta, dpo_loss_type, dpo_label_smoothing ... are)"
_MULTIMODAL = "multimodal (image/audio) training is not supported; axlora trains text-only causal language models"
_FULL_FT = "axlora trains LoRA adapters, not full or partial fine-tuning of the base weights"
_PARALLEL = ("axlora shards models with FSDP (fsdp_config) or DeepSpeed ZeRO (deepspeed: zero3) across data-parallel "
             "GPUs; hybrid sharding, tensor and context parallelism are not supported")
_SCHEDULE = ("learning-rate groups by module are not supported; loraplus_lr_ratio and embedding_lr set the rates of "
             "the LoRA B and embedding weights")
_EVALS = ("benchmarks are not built in: axlora reports eval_loss and, with do_causal_lm_eval, scores of completed "
          "validation rows; run benchmarks (lm-eval) on the merged model")
_TRACKERS = ("only Weights & Biases (wandb_*), MLflow (mlflow_*), SwanLab (swanlab_*) and OpenTelemetry metrics "
             "(use_otel_metrics) are integrated; metrics are also in logs/metrics.jsonl")

REJECTED: dict[str, Rejected] = {
    **_rejected(
        _RL,
        "trl", "vllm", "reward_model", "process_reward_model", "center_rewards_coefficient", "num_labels", "ebft",
    ),
    **_rejected(
        _RL_EXTRAS, "dpo_loss_weights", "dpo_generate_during_eval", "dpo_norm_loss", "rpo_alpha",
    ),
    **_rejected(
        _MULTIMODAL, "image_size", "image_resize_algorithm", "processor_type", "freeze_mm_modules",
    ),
    **_rejected(
        _FULL_FT + "; use lora_modules_to_save to train whole modules besides the LoRA",
        "lisa_n_layers", "lisa_step_interval", "lisa_layers_attribute", "reinit_weights",
        "random_init_weights",
    ),
    **_rejected(
        _PARALLEL,
        "deepcompile", "dp_shard_size", "dp_replicate_size", "tensor_parallel_size", "context_parallel_size",
        "sequence_parallel_degree", "heads_k_stride", "ring_attn_func", "qlora_sharded_model_loading",
        "fp8_enable_fsdp_float8_all_gather",
    ),
    **_rejected(
        "axlora places the whole model on each GPU; per-device placement and memory caps are not supported",
        "device_map", "max_memory", "gpu_memory_limit",
    ),
    **_rejected(
        "streamed supervised datasets are not supported (datasets are prepared once and memory-mapped); a text "
        "corpus to stream goes under pretraining_dataset, which is read in order (no shuffle buffer) so a resume "
        "continues at the exact token",
        "streaming", "streaming_multipack_buffer_size", "pretrain_multipack_buffer_size",
    ),
    **_rejected(
        "pretraining_dataset rows are packed with sample_packing: true (attention kept within each document) or "
        "hold one document piece each; concatenation with attention across documents is not available",
        "pretraining_sample_concatenation",
    ),
    **_rejected(
        "quantization-aware training, post-training quantization and FP8 training are not supported; "
        "QLoRA is load_in_4bit",
        "qat", "quantization", "fp8",
    ),
    **_rejected("GPTQ-quantized base models are not supported; load the unquantized model with load_in_4bit", "gptq"),
    **_rejected("layer replication changes the architecture; not supported", "peft_layer_replication"),
    **_rejected(_SCHEDULE, "lr_groups"),
    **_rejected(
        "settings of the GaLore and CAME optimizers, which axlora does not have; other optimizer arguments go in "
        "optim_args", "optim_target_modules", "adam_beta3", "adam_epsilon2",
    ),
    **_rejected("axlora does not search for a batch size; set micro_batch_size", "auto_find_batch_size"),
    **_rejected("PoSE context extension is not supported", "use_pose", "pose_split_on_token_ids",
                "pose_max_context_len", "pose_num_chunks"),
    **_rejected(
        "this attention variant is not available; use attn_implementation (sdpa, flash_attention_2, ...)",
        "s2_attention",
    ),
    **_rejected("the EAFT loss is not supported; axlora trains with cross-entropy", "use_eaft"),
    **_rejected("layer offloading is not supported; use activation_offloading", "layer_offloading"),
    **_rejected(_EVALS, "do_bench_eval", "bench_dataset", "bench_split"),
    **_rejected(
        "axlora checkpoints always hold the full training state so that a run can resume", "save_only_model",
    ),
    **_rejected("axlora shuffles the rows of all datasets together with seed", "shuffle_before_merging_datasets"),
    **_rejected(
        "sharding the dataset is not supported; take part of it with split slicing (split: \"train[:10%]\")",
        "dataset_shard_num", "dataset_shard_idx", "num_dataset_shards_to_save",
    ),
    **_rejected("a separate evaluation dataset is not supported; use val_set_size", "test_datasets"),
    **_rejected("pushing the prepared dataset is not supported", "push_dataset_to_hub"),
    **_rejected("axlora evaluates with sequence_len", "eval_sequence_len"),
    **_rejected("axlora keeps samples of any length up to sequence_len", "min_sample_len"),
    **_rejected("axlora always tokenizes with the prepared cache", "skip_prepare_dataset"),
    **_rejected(
        "a default system message is not supported; put the system message in the data (or its `system` column)",
        "default_system_message",
    ),
    **_rejected(
        "re-initialising or renaming vocabulary rows is not supported; add new tokens with tokens:",
        "fix_untrained_tokens", "added_tokens_overrides",
    ),
    **_rejected("axlora reads the config class from the model", "cls_model_config"),
    **_rejected("arbitrary from_pretrained arguments are not supported; use the dedicated keys",
                "overrides_of_model_kwargs", "model_kwargs"),
    **_rejected("rope_scaling moved under model_config (overrides_of_model_config)", "rope_scaling"),
    **_rejected("removed from Axolotl; set sequence_len and sample_packing", "max_packed_sequence_len"),
    **_rejected("a custom trainer class is not supported", "trainer_cls"),
    **_rejected("dynamic checkpoint triggers are not supported; use save_steps", "dynamic_checkpoint"),
    **_rejected(
        "Ray launching is not supported", "use_ray", "ray_run_name", "ray_num_workers", "resources_per_worker",
    ),
    **_rejected(
        _TRACKERS,
        "use_comet", "comet_api_key", "comet_workspace", "comet_project_name", "comet_experiment_key", "comet_mode",
        "comet_online", "comet_experiment_config", "use_trackio", "trackio_project_name", "trackio_run_name",
        "trackio_space_id",
    ),
    **_rejected(
        "PiSSA/OLoRA/LoftQ/EVA-style LoRA initialisation is not supported; axlora uses peft's default",
        "peft_init_lora_weights",
    ),
    **_rejected(
        "axlora keeps the LoRA weights in float32 (peft's default)", "peft_autocast_adapter_dtype",
    ),
}

# A few rejected keys accept more than "off": values that already are what axlora does.
REJECTED["pretrain_multipack_attn"] = Rejected(
    "packed documents always attend only to themselves (sample_packing)", accepts=lambda value, data: value is True,
    accepted="true")
REJECTED["save_safetensors"] = Rejected(
    "axlora always writes safetensors", accepts=lambda value, data: value is True, accepted="true"
)
REJECTED["peft_init_lora_weights"] = Rejected(
    REJECTED["peft_init_lora_weights"].reason, accepts=lambda value, data: value is True, accepted="true"
)
REJECTED["peft_autocast_adapter_dtype"] = Rejected(
    REJECTED["peft_autocast_adapter_dtype"].reason, accepts=lambda value, data: value is True, accepted="true"
)
REJECTED["shuffle_merged_datasets"] = Rejected(
    "axlora always shuffles the mixed rows with seed", accepts=lambda value, data: value is True, accepted="true"
)
REJECTED["base_model_config"] = Rejected(
    "axlora reads the model config from base_model",
    accepts=lambda value, data: not value or value == data.get("base_model"),
    accepted="the same as base_model",
)

DATASET_REFUSED: dict[str, str] = {
    "input_transform": "input transforms are not supported; transform the data files first",
    "preprocess_shards": "axlora prepares data in worker processes (dataset_processes); chunked preprocessing is not "
    "needed",
    "input_format": "a prompt format string is not supported; use type: input_output with segments",
    "field_human": "the old sharegpt field names are not supported; use message_property_mappings",
    "field_model": "the old sharegpt field names are not supported; use message_property_mappings",
    "message_field_training_detail": "per-character training spans are not supported; use message_field_training "
    "(a whole message) or type: input_output",
    "logprobs_field": "knowledge distillation is not supported",
    "temperature": "knowledge distillation is not supported",
    "trust_remote_code": "dataset loading scripts are not run; use data files (JSON, Parquet, CSV, Arrow)",
}
"""Axolotl dataset-entry keys axlora refuses (a value that asks for nothing is accepted), and why."""

PLUGINS: dict[str, Plugin] = {
    "LigerPlugin": Plugin("Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)", True),
    "CutCrossEntropyPlugin": Plugin("Cut Cross-Entropy: the same loss without materialising the logits", True,
                                    sets="cut_cross_entropy"),
    "KernelsPlugin": Plugin("Hub and MoE kernels (ScatterMoE, SonicMoE)", True),
    "MoeOptimizedPlugin": Plugin("grouped-GEMM MoE kernels (moe_kernels)", True),
    "SpectrumPlugin": Plugin("Spectrum: picks layers to fully fine-tune (" + _FULL_FT + ")", False),
    "LMEvalPlugin": Plugin("lm-eval benchmarks after training (" + _EVALS + ")", False),
    "GrokfastPlugin": Plugin("Grokfast gradient filtering, which changes the optimization", False),
    "KDPlugin": Plugin("knowledge distillation from a teacher model", False),
    "DiffusionPlugin": Plugin("masked diffusion language-model training (LLaDA-style)", False, sets="diffusion"),
    "DiffusionGemmaPlugin": Plugin("block-diffusion fine-tuning of DiffusionGemma", False, sets="block_diffusion"),
    "LLMCompressorPlugin": Plugin("sparse fine-tuning with llm-compressor", False),
    "DenseMixerPlugin": Plugin("MoE router training with DenseMixer", False),
    "SwanLabPlugin": Plugin("SwanLab experiment tracking", False, equivalent="swanlab_project / use_swanlab"),
    "ExpertParallelPlugin": Plugin("MoE experts split over processes, tokens sent to them", False,
                                   equivalent="expert_parallel_size"),
}
"""Axolotl plugins by class name (``axolotl.integrations.liger.LigerPlugin`` -> ``LigerPlugin``)."""

VALUE_HINTS: dict[str, dict[Any, str]] = {
    "gradient_checkpointing": {
        value: "offloading to disk or Unsloth's checkpointing is not supported; use gradient_checkpointing: offload "
        "(activations in CPU memory)"
        for value in ("offload_disk", "unsloth")
    },
    "bf16": {"full": "bfloat16 evaluation is what bf16: true already does in axlora; use bf16: true"},
    "save_strategy": {
        "best": "with early_stopping_patience, final/ holds the adapter with the lowest eval_loss; "
        "use save_strategy: steps or epoch"
    },
    "hub_strategy": {
        value: "axlora pushes the final adapter once, at the end; use hub_strategy: end"
        for value in ("every_save", "checkpoint", "all_checkpoints")
    },
    "adapter": {
        value: "axlora trains LoRA adapters only; use adapter: lora (or qlora)"
        for value in ("llama-adapter", "moe_sieve", "ia3", "loha", "lokr")
    },
}
"""Axolotl values of supported keys that axlora does not take, with what to write instead."""

SWITCHED: dict[str, str] = {key: "do_causal_lm_eval" for key in ("eval_max_new_tokens", "eval_causal_lm_metrics",
                                                                  "eval_causal_lm_max_rows")}
SWITCHED["eval_table_max_new_tokens"] = "eval_table_size"
SWITCH_WORDS: dict[str, str] = {"eval_table_size": "eval_table_size (the rows to complete)"}
"""How a note names a switch that is not a true/false key."""
"""Schema keys that act only with another one on: set without it, they get a note (Axolotl ignores them)."""


@dataclass
class Translation:
    """An Axolotl-flavoured mapping turned into axlora keys, with what to tell the user about it."""

    data: dict[str, Any]
    notes: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)


def plugin_name(entry: str) -> str:
    """``axolotl.integrations.liger.LigerPlugin`` -> ``LigerPlugin`` (module paths moved between releases)."""
    return entry.rsplit(".", 1)[-1]


def translate(data: dict[str, Any], schema_keys: set[str]) -> Translation:
    """Apply the tables to a parsed config; schema keys pass through untouched.

    Problems and notes are ``(key, message)`` pairs; the caller adds the file and line.
    """
    out = Translation(data={})
    for key, value in data.items():
        if key in schema_keys:
            out.data[key] = value
        elif key in RENAMED:
            new = RENAMED[key]
            if new in data:
                out.problems.append((key, f"'{key}' is Axolotl's name for '{new}'; set only one of them."))
            else:
                out.data[new] = value
                out.renamed[key] = new
        elif key == "plugins":
            _plugins(value, out)
        elif key == "auto_resume_from_checkpoints":
            _auto_resume(value, data, out)
        elif key in NO_OP:
            if not asks_for_nothing(value):
                out.notes.append((key, f"'{key}' has no effect in axlora: {NO_OP[key].reason}."))
        elif key in REJECTED:
            rule = REJECTED[key]
            if not rule.accepts(value, data):
                out.problems.append((key, rejection_message(key, rule)))
        else:
            out.data[key] = value  # unknown: the loader reports it with a suggestion
    _value_hints(out)
    out.notes += [(key, f"'{key}' has no effect in axlora without {SWITCH_WORDS.get(switch, switch + ': true')}.")
                  for key, switch in SWITCHED.items() if not asks_for_nothing(data.get(key)) and not data.get(switch)]
    return out


def rejection_message(key: str, rule: Rejected) -> str:
    """One line: the key, why axlora refuses it, and what to do."""
    fix = "remove it" if rule.accepted == Rejected.accepted else f"remove it or set it to {rule.accepted}"
    return f"{key}: {rule.reason}; {fix} (Axolotl key)."


def _plugins(value: Any, out: Translation) -> None:
    entries = value if isinstance(value, list) else [value]
    for entry in entries:
        if not isinstance(entry, str):
            out.problems.append(("plugins", f"plugins: expected a list of plugin names, got {entry!r}."))
            continue
        plugin = PLUGINS.get(plugin_name(entry))
        if plugin is not None and plugin.sets:
            out.data.setdefault(plugin.sets, True)
            where = " (used where its package is installed)" if plugin.speed_only else ""
            out.notes.append(("plugins", f"plugin {plugin_name(entry)}: {plugin.what}; axlora reads it as "
                                         f"{plugin.sets}: true{where}."))
        elif plugin is None:
            out.problems.append((
                "plugins",
                f"plugins: unknown Axolotl plugin '{entry}'; axlora has no plugin system: remove it "
                "(docs/axolotl-compat.md lists the plugins axlora recognises).",
            ))
        elif plugin.equivalent:
            out.notes.append(("plugins", f"plugin {plugin_name(entry)} ({plugin.what}) is {plugin.equivalent} "
                                         "in axlora."))
        elif plugin.speed_only:
            out.notes.append(("plugins", f"plugin {plugin_name(entry)}: {plugin.what}; it changes speed and memory "
                                         "only, not what is trained, and axlora runs without it."))
        else:
            out.problems.append(("plugins", f"plugins: {plugin_name(entry)} is not supported: {plugin.what}."))


def _auto_resume(value: Any, data: dict[str, Any], out: Translation) -> None:
    if value is True and "resume_from_checkpoint" not in data:
        out.data["resume_from_checkpoint"] = "auto"
        message = TRANSLATED["auto_resume_from_checkpoints"]
        out.notes.append(("auto_resume_from_checkpoints", f"auto_resume_from_checkpoints: {message}."))


def _value_hints(out: Translation) -> None:
    for key, hints in VALUE_HINTS.items():
        value = out.data.get(key)
        if isinstance(value, str) and value in hints:
            out.problems.append((key, f"{key}: {hints[value]} (got {value!r})."))
            del out.data[key]


def noop_schema_properties() -> dict[str, dict[str, Any]]:
    """JSON Schema entries for the accepted Axolotl-only keys, so editors do not flag them."""
    properties: dict[str, dict[str, Any]] = {
        key: {"description": f"Axolotl key accepted with no effect: {rule.reason}."} for key, rule in NO_OP.items()
    }
    for old, new in RENAMED.items():
        properties[old] = {"description": f"Axolotl's name for {new}."}
    properties["plugins"] = {
        "description": "Axolotl plugins: speed-only ones (Liger, Cut Cross-Entropy, kernels) are accepted with a note.",
        "type": "array",
        "items": {"type": "string"},
    }
    return properties
