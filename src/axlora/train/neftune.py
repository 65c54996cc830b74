"""NEFTune (``neftune_noise_alpha``): uniform noise on the input embeddings in training steps.

transformers' own hook adds noise of scale alpha / sqrt(sequence length x width) to the output of the input
embedding layer while that layer is in training mode; evaluation and generation put the model in eval mode, so
they see the embeddings as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from axlora.config.schema import Config
from axlora.core.errors import UserError


def check_neftune(config: Config) -> None:
    """Refuse NEFTune where it would perturb more than the policy's training forwards."""
    if config.uses_neftune() and config.rl:
        raise UserError(f"neftune_noise_alpha / rl: NEFTune noise applies to supervised runs; rl: {config.rl} "
                        "compares the policy with its reference on the same embeddings. Remove one of them.")


def start_neftune(model, config: Config, say: Callable[[str], None]) -> None:
    """Hook the noise onto the input embeddings of ``model`` (the peft model, before any wrapping)."""
    if not config.uses_neftune():
        return
    from transformers.integrations.neftune import activate_neftune

    activate_neftune(model, config.neftune_noise_alpha)
    say(f"neftune: noise alpha {config.neftune_noise_alpha:g} on the input embeddings in training steps")
