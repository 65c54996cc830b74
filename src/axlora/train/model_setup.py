"""The model a run trains: the base weights, the adapter on them, and how the training loss is computed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from axlora.config.schema import Config
from axlora.model.adapter import attach_adapter, effective_adapter_settings
from axlora.model.adapter_choice import AdapterChoice
from axlora.model.load import load_base_model
from axlora.train.expert_parallel_setup import place_experts
from axlora.train.fsdp import materialize_empty
from axlora.train.precision import Precision
from axlora.train.runtime import Runtime


def load_model(config: Config, runtime: Runtime, tokenizer, adapter: AdapterChoice):
    """The base model with the adapter attached, its LoRA initialized from the seed alone."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    # fsdp_config.cpu_ram_efficient_loading: only rank 0 reads the weights; the others get theirs after sharding
    empty = bool(runtime.fsdp and runtime.fsdp.load_on_main_only and runtime.world_size > 1 and not runtime.is_main)
    model = load_base_model(config, runtime.precision.torch_dtype, tokenizer=tokenizer, log=runtime.say, empty=empty)
    # seeded again: the LoRA's initial weights must not depend on what loading drew from the RNG
    # (DeepSpeed ZeRO-3 loads the base partitioned, which draws differently)
    set_seed(config.seed)
    model = attach_adapter(model, config, adapter, runtime.say)
    place_experts(model, runtime.expert_group, runtime.say)  # expert_parallel_size: this process's experts only
    if empty:
        materialize_empty(model)
    return model


def choose_loss(config: Config, peft_model, say) -> Callable[[], contextlib.AbstractContextManager]:
    """A context for the training forward and backward: the model's own loss or ``chunked_cross_entropy``'s, and
    with ``activation_offloading`` the activations kept for backward moved to CPU memory."""
    contexts: list[Callable[[], contextlib.AbstractContextManager]] = []
    if config.chunked_cross_entropy:
        from axlora.train.chunked_loss import ChunkedCrossEntropy  # imports torch

        chunked = ChunkedCrossEntropy(peft_model.get_base_model(), config.chunked_cross_entropy_num_chunks)
        say(f"loss: chunked cross-entropy ({config.chunked_cross_entropy_num_chunks} chunks, label tokens only)")
        contexts.append(chunked.active)
    if config.activation_offloading:
        contexts.append(_offloaded_activations(say))
    if not contexts:
        return contextlib.nullcontext
    if len(contexts) == 1:
        return contexts[0]
    return lambda: _all_of(contexts)


@contextlib.contextmanager
def _all_of(contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context())
        yield


def _offloaded_activations(say) -> Callable[[], contextlib.AbstractContextManager]:
    """torch's saved-tensor hooks: each tensor autograd keeps for backward waits in (pinned) CPU memory and comes
    back for its backward; the values, and so the losses and gradients, are the same."""
    import torch

    pin = torch.cuda.is_available()
    say("memory: activations saved for backward wait in CPU memory (activation_offloading)")
    return lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin)


def config_as_trained(config: Config, peft_model, adapter: AdapterChoice) -> Config:
    """The config with a continued adapter's own rank/alpha/targets, so final/axlora.yml tells the truth."""
    if adapter.case != "continue":
        return config
    return config.model_copy(update=effective_adapter_settings(peft_model))


def parameters_line(model, precision: Precision) -> str:
    trainable, total = _count_parameters(model)
    return f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), {precision.name}"


def _count_parameters(model) -> tuple[int, int]:
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight's full size

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
