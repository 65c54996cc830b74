"""Sample generations before and after training, so a user sees what the run changed."""

from __future__ import annotations

from axlora.config.schema import Config


def sample_prompt_texts(config: Config, tokenizer=None) -> list[str]:
    """Each ``sample_prompts`` entry rendered as the first dataset's format renders a prompt.

    A plain string is the format's main input (an alpaca instruction, a user message for chat formats); a
    mapping holds the format's fields (e.g. instruction, input) without the completion. Chat formats render
    with their chat template, so they need ``tokenizer`` (loaded from the config when not given).
    """
    from axlora.data.formats import build_format, needs_tokenizer

    if not config.sample_prompts:
        return []
    if tokenizer is None and needs_tokenizer(config):
        from axlora.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config, log=lambda *_: None)
    fmt = build_format(config, 0, tokenizer)
    return [fmt.prompt(entry) for entry in config.sample_prompts]


def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, synced_ranks: bool = False) -> list[str]:
    """Greedy completions (deterministic, so before/after differ only by what training changed).

    ``synced_ranks``: every rank generates together (the weights are partitioned across them, ZeRO-3).
    """
    from axlora.model.generate import Sampling, generate_texts, prompt_ids

    if not prompts:
        return []
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    return generate_texts(model, tokenizer, ids, Sampling(max_new_tokens=max_new_tokens), synced_ranks=synced_ranks)
