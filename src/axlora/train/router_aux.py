"""``router_aux_loss_coef``: the load-balancing loss of a mixture-of-experts router, added to the training loss.

transformers' MoE models (Mixtral, Qwen-MoE, gpt-oss, ...) compute the router's load-balancing loss when a forward
asks for ``output_router_logits`` and add ``config.router_aux_loss_coef`` times it to the loss they return. The
base model loads with the config's coefficient (``model.load``), and ``step.train_step`` asks for the router logits
in training forwards only, so evaluation keeps reporting the token loss alone, as the logged ``loss`` does.
"""

from __future__ import annotations

from axlora.config.schema import Config
from axlora.core.errors import UserError


def router_aux_coefficient(config: Config, model) -> float | None:
    """The coefficient when the config sets one (None when it does not); refused for a model without a router."""
    coefficient = config.router_aux_loss_coef
    if not coefficient:
        return None
    if config.rl:
        raise UserError(f"router_aux_loss_coef / rl: the router loss is added to the token loss of supervised "
                        f"training; rl: {config.rl} optimizes a preference objective. Remove router_aux_loss_coef.")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base.config, "output_router_logits"):
        raise UserError(f"router_aux_loss_coef: {config.base_model} (model_type "
                        f"'{getattr(base.config, 'model_type', None)}') has no mixture-of-experts router; remove it.")
    return coefficient

