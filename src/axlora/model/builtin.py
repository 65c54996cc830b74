"""The offline demo's model: a tiny Llama-architecture model built on first use.

Nothing here needs the network. ``axlora:tiny-llama`` as ``base_model`` names a small Llama with a byte-level
BPE tokenizer trained with ``tokenizers`` on the demo's own text. It is built once into the user cache
(atomically, about a minute on two CPU cores) and from then on is an ordinary local model directory.

A random-weight model cannot learn to add in a minute, and a real one cannot be downloaded offline, so the
built-in model is briefly pre-trained (all parameters, seeded) on neighbouring alpaca tasks over the same
"12+35" inputs: repeat the first number, repeat the second number, add the two last digits. It then knows
the prompt template, where the numbers are and the one-digit sums, but not "Add the two numbers.": before
the demo's LoRA it answers that with something else (a copied number, a digit sum), after it with the sum,
because the LoRA learned to combine the digits with the carry. Its tokenizer has one token for each fixed
piece of the alpaca template, so a demo sample is about 16 tokens instead of 60, which keeps steps cheap.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from axlora.core.atomic import atomic_directory
from axlora.core.errors import UserError
from axlora.core.names import BUILTIN_MODEL_PREFIX
from axlora.data.demo_rows import addition_rows, pretrain_rows

TINY_LLAMA = "tiny-llama"
_TINY_VERSION = "v2"
# What axlora:tiny-llama is; a change here needs a new _TINY_VERSION (the cache is keyed by it).
_TINY_LLAMA_BUILD = {"hidden_size": 128, "num_layers": 4, "template_tokens": True, "pretrain_steps": 400}

def cache_dir() -> Path:
    """Where built-in models are built: ``$AXLORA_CACHE`` or ``~/.cache/axlora``."""
    return Path(os.environ.get("AXLORA_CACHE", Path.home() / ".cache" / "axlora")).expanduser()


def resolve_builtin(name: str) -> Path:
    """Directory of a built-in model, building it on first use."""
    kind = name[len(BUILTIN_MODEL_PREFIX):]
    if kind != TINY_LLAMA:
        raise UserError(f"base_model: unknown built-in model '{name}'; available: {BUILTIN_MODEL_PREFIX}{TINY_LLAMA}.")
    target = cache_dir() / "models" / f"{TINY_LLAMA}-{_TINY_VERSION}"
    if not (target / "config.json").exists():
        print(f"{name}: first use, building it into {target} (pre-training, about a minute on 2 CPU cores)",
              file=sys.stderr, flush=True)
        started = time.perf_counter()
        build_tiny_llama(target, **_TINY_LLAMA_BUILD)
        print(f"{name}: built in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return target


def build_tiny_llama(
    target: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    seed: int = 0,
    pretrain_steps: int = 0,
    template_tokens: bool = False,
) -> Path:
    """Train a tokenizer and save a tiny Llama with it, atomically; random weights unless ``pretrain_steps``.

    ``pretrain_steps`` > 0 trains all parameters that many steps on ``PRETRAIN_TASKS`` (seeded);
    ``template_tokens`` is passed to ``train_tiny_tokenizer``. The defaults build an
    untrained model in a second or two, for tests; ``axlora:tiny-llama`` is ``_TINY_LLAMA_BUILD``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # replace=False: when another process built it meanwhile, theirs is kept
    with atomic_directory(target, replace=False) as tmp:
        tokenizer = train_tiny_tokenizer(template_tokens=template_tokens)
        tokenizer.save_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            if pretrain_steps > 0:
                pretrain(model, tokenizer, pretrain_steps, seed=seed)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
    return target


def pretrain(model, tokenizer, steps: int, *, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> list[float]:
    """Train all of ``model`` on ``pretrain_rows`` the way axlora trains (loss on the response + EOS only).

    AdamW with a 10% warmup and linear decay; returns the loss of each step. About 0.1 s a step for the
    demo's model on two CPU cores.
    """
    import torch

    from axlora.data.formats import alpaca

    pad = tokenizer.pad_token_id
    samples = []
    for row in pretrain_rows(steps * batch_size, seed=seed):
        prompt, response = (segment.text for segment in alpaca(row))
        prompt_ids = tokenizer(prompt).input_ids  # with BOS exactly when the pipeline adds one
        response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        samples.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (steps - step) / (steps - warmup + 1))
    )
    model.train()
    losses = []
    for step in range(steps):
        batch = samples[step * batch_size:(step + 1) * batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train_tiny_tokenizer(*, template_tokens: bool = False):
    """A byte-level BPE (digits split one by one) trained on the demo's own text.

    ``template_tokens`` (the built-in model's tokenizer) also trains on the pre-training tasks' text, with a
    512 vocabulary, and adds each fixed piece of the alpaca template as one token, as chat models have
    tokens for their template markers: a demo prompt is then 13 tokens instead of 55.
    """
    import re

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from axlora.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512 if template_tokens else 384, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rows = addition_rows(200, seed=1) + (pretrain_rows(300, seed=1) if template_tokens else [])
    corpus = []
    for row in rows:
        corpus.append(ALPACA_PROMPT_WITH_INPUT.format(**row) + row["output"])
        corpus.append(ALPACA_PROMPT_NO_INPUT.format(**row) + row["output"])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if template_tokens:
        pieces = {p for t in (ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT) for p in re.split(r"\{\w+\}", t) if p}
        tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in sorted(pieces)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
