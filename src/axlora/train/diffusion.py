"""``diffusion:``: masked diffusion language-model training on a causal LM (Axolotl's DiffusionPlugin).

The noising happens in the collators (``data.diffusion_collate``); here the run is set up for it: the mask token
is found, the model's ``loss_function`` becomes the masked-diffusion loss, and both collators are wrapped
(training masks drawn per step, process and micro batch; validation masks fixed by the seed and the batch). The
loss is ``sum over masked tokens of w * CE`` divided by the step's global count of answer tokens
(``num_items_in_batch``, summed over all processes as for every axlora loss), which for one sequence is LLaDA's
``1/L * sum over masked of CE / p``. Axolotl averages that per sequence instead; the token count keeps micro
batch size, accumulation and process count from changing what is optimized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from axlora.config.diffusion_keys import DEFAULT_MASK_TOKEN, MASKED_ATTENTION, DiffusionSettings
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX
from axlora.data.diffusion_collate import DiffusionCollator, NoisePlan
from axlora.train.data_setup import TrainingData

UNREAD_KEYS = ("noise_schedule", "min_mask_ratio", "max_mask_ratio", "num_diffusion_steps", "generation_interval",
               "num_generation_samples", "generation_steps", "generation_temperature", "generation_max_length")
"""Keys of the block that Axolotl accepts and its trainer never reads (the generation ones: without samples)."""


def masked_diffusion_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                          diffusion_weights=None, **kwargs):
    """``sum_j w_j * CE(logits[j - 1], labels[j]) / num_items_in_batch`` over masked positions j.

    ``labels`` hold the original token at masked positions (-100 elsewhere) and ``diffusion_weights`` their weights;
    without weights (a forward outside the diffusion batches) this is the model's causal loss.
    """
    if diffusion_weights is None:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, **kwargs)
    targets = labels[:, 1:].to(logits.device)
    weights = diffusion_weights[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=ignore_index, reduction="none")
    total = (token_loss * weights.reshape(-1)).sum()
    count = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum().clamp(min=1)
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def resolve_mask_token(settings: DiffusionSettings, tokenizer, model_config, embedding_rows: int) -> int:
    """The mask token's id: ``mask_token_id``, the model's own ``mask_token_id``, or ``mask_token_str`` (default
    ``<|diffusion_mask|>``) as a token of the tokenizer.

    Axolotl adds a missing mask token with a new, untrained embedding row that a LoRA neither trains nor saves; here
    it must be in the tokenizer (``special_tokens``, with its embedding trained), so the adapter carries it.
    """
    if settings.mask_token_id is not None:
        if settings.mask_token_id >= embedding_rows:
            raise UserError(f"diffusion.mask_token_id: {settings.mask_token_id} is not a token of this model "
                            f"(its embeddings have {embedding_rows} rows).")
        return settings.mask_token_id
    own = getattr(model_config, "mask_token_id", None)
    if settings.mask_token_str is None and isinstance(own, int) and 0 <= own < embedding_rows:
        return own
    name = settings.mask_token_str or DEFAULT_MASK_TOKEN
    token_id = tokenizer.convert_tokens_to_ids(name)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and 0 <= token_id < embedding_rows:
        return token_id
    raise UserError(
        f"diffusion.mask_token_str: '{name}' is not a token of the tokenizer. Add it with special_tokens: "
        f"{{additional_special_tokens: ['{name}']}} and train its embedding (lora_modules_to_save: [embed_tokens, "
        "lm_head]), or set diffusion.mask_token_id to an unused special token of the vocabulary.")


def start_diffusion(config: Config, peft_model, data: TrainingData, say) -> None:
    """Mask token, loss function and noising collators for ``diffusion:`` (nothing when it is off)."""
    settings = config.diffusion
    if settings is None:
        return
    causal_lm = peft_model.get_base_model()
    attention = getattr(causal_lm.config, "_attn_implementation", None)
    if attention not in MASKED_ATTENTION:
        raise UserError(f"diffusion: attention '{attention}' takes no per-document bidirectional mask; set "
                        "attn_implementation: sdpa or eager.")
    tokenizer = data.tokenizer
    rows = causal_lm.get_input_embeddings().num_embeddings
    mask_id = resolve_mask_token(settings, tokenizer, causal_lm.config, rows)
    visible = tuple(sorted({i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                            if i is not None} - {mask_id}))
    plan = NoisePlan(mask_id, visible, settings.noise_floor, settings.weighting, settings.reduction, attention,
                     seed=config.seed)
    causal_lm.loss_function = masked_diffusion_loss
    data.collate = DiffusionCollator(data.collate, plan)  # a step masks through step_collator
    data.val_collate = DiffusionCollator(data.val_collate, plan)
    say(f"diffusion: masked diffusion objective; mask token {mask_id} ({tokenizer.convert_ids_to_tokens(mask_id)!r}), "
        f"p = (1 - {settings.noise_floor:g}) t + {settings.noise_floor:g} per document, weighting {settings.weighting}, "
        f"{settings.reduction}; bidirectional attention within each document; training masks seeded by seed, step, "
        "process and micro batch; eval masks with a fixed seed")
    if settings.generate_samples is None:
        say("diffusion: no samples by iterative unmasking during training (Axolotl's generate_samples is not built)")
    unread = sorted(settings.model_fields_set & set(UNREAD_KEYS))
    if unread:
        say(f"diffusion: {', '.join(unread)} have no effect: Axolotl's trainer does not read them either "
            "(t ~ U(0, 1); samples are not generated)")
