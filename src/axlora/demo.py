"""The offline demo: a learnable generated task and a tiny Llama-architecture model built on first use.

Nothing here needs the network. ``axlora:tiny-llama`` as ``base_model`` names a small random-weight Llama
with a byte-level BPE tokenizer trained with ``tokenizers`` on the demo task's text; it is written once
into the user cache (atomically) and from then on is an ordinary local model directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

BUILTIN_PREFIX = "axlora:"
TINY_LLAMA = "tiny-llama"
_TINY_VERSION = "v1"

ADD_INSTRUCTION = "Add the two numbers."


def addition_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows that ask for the sum of two numbers below 50: small enough to learn in a minute."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"instruction": ADD_INSTRUCTION, "input": f"{a}+{b}", "output": str(a + b)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSON lines (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def cache_dir() -> Path:
    """Where built-in models are built: ``$AXLORA_CACHE`` or ``~/.cache/axlora``."""
    return Path(os.environ.get("AXLORA_CACHE", Path.home() / ".cache" / "axlora")).expanduser()


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def resolve_builtin(name: str) -> Path:
    """Directory of a built-in model, building it on first use."""
    kind = name[len(BUILTIN_PREFIX):]
    if kind != TINY_LLAMA:
        from axlora.errors import UserError

        raise UserError(f"base_model: unknown built-in model '{name}'; available: {BUILTIN_PREFIX}{TINY_LLAMA}.")
    target = cache_dir() / "models" / f"{TINY_LLAMA}-{_TINY_VERSION}"
    if not (target / "config.json").exists():
        build_tiny_llama(target)
    return target


def build_tiny_llama(target: Path, *, hidden_size: int = 128, num_layers: int = 4, seed: int = 0) -> Path:
    """Train a byte-level BPE tokenizer and save a random-weight tiny Llama with it, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = train_tiny_tokenizer()
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
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        if target.exists():  # another process built it meanwhile; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_tiny_tokenizer():
    """A byte-level BPE (digits split one by one) trained on the demo task's own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from axlora.data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = []
    for row in addition_rows(200, seed=1):
        corpus.append(ALPACA_PROMPT_WITH_INPUT.format(**row) + row["output"])
        corpus.append(ALPACA_PROMPT_NO_INPUT.format(**row) + row["output"])
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
