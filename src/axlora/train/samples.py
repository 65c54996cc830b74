"""Sample generations before and after training, so a user sees what the run changed."""

from __future__ import annotations

from typing import Any

from axlora.config.schema import Config
from axlora.data.formats import FORMATS


def sample_prompt_texts(config: Config) -> list[str]:
    """Each ``sample_prompts`` entry rendered as the first dataset's format renders a prompt.

    A plain string is an alpaca instruction; a mapping holds the format's fields (e.g. instruction,
    input) without the completion.
    """
    fmt = FORMATS[config.datasets[0].type]
    texts = []
    for entry in config.sample_prompts:
        row: dict[str, Any] = {"instruction": entry} if isinstance(entry, str) else dict(entry)
        row.setdefault("output", "")
        segments = fmt(row)
        prompt = ""
        for segment in segments:
            if segment.trainable:
                break
            prompt += segment.text
        texts.append(prompt)
    return texts


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions (deterministic, so before/after differ only by what training changed)."""
    import torch

    if not prompts:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                outputs.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs
