"""diffusion: (Axolotl's DiffusionPlugin): the masking, the attention, the loss on real logits, the config, a run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from axlora.config.diffusion_keys import DiffusionSettings
from axlora.core.errors import UserError
from axlora.data.collate import PackedCollator, PaddedCollator, model_inputs
from axlora.data.demo_rows import addition_rows, write_jsonl
from axlora.data.diffusion_collate import (
    WEIGHTS_KEY,
    DiffusionCollator,
    NoisePlan,
    diffusion_inputs,
    document_ids,
    noise_batch,
)
from axlora.train.diffusion import masked_diffusion_loss, resolve_mask_token

from conftest import logged, main_in_process, run_cli

MASK, BOS, EOS, PAD = 5, 1, 2, 3
PLAN = NoisePlan(mask_token_id=MASK, keep_visible=(BOS, EOS, PAD))


def _row(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    ids = prompt + answer
    return {"input_ids": ids, "labels": [-100] * len(prompt) + answer, "position_ids": list(range(len(ids)))}


def _packed(*samples: dict[str, list[int]]) -> dict[str, list[int]]:
    return {key: [value for sample in samples for value in sample[key]] for key in ("input_ids", "labels",
                                                                                    "position_ids")}


def _tiny_llama(attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attn_implementation=attention)
    return LlamaForCausalLM(config).eval()


def test_masking_rate_follows_each_rows_noise_level():
    rows = [_row([BOS, 7], list(range(10, 60)) * 8) for _ in range(300)]
    batch = noise_batch(PaddedCollator(pad_token_id=PAD)(rows), PLAN, torch.Generator().manual_seed(1))
    masked = batch["labels"] != -100
    rates = masked.sum(1).float() / 400  # every answer token may be masked (none is bos/eos/pad)
    # the weight of a masked token is 1 / p: read back each row's p and compare it with the row's masking rate
    p = torch.tensor([1.0 / batch[WEIGHTS_KEY][i][masked[i]][0].item() for i in range(len(rows))])
    assert (rates - p).abs().max() < 0.1  # binomial, 400 draws: sd <= 0.025
    assert abs(float((rates - p).mean())) < 0.01
    assert 0.4 < float(p.mean()) < 0.6 and float(p.min()) < 0.1 and float(p.max()) > 0.9  # t ~ U(0, 1)
    assert bool((batch[WEIGHTS_KEY][masked] > 1).all()) and bool((batch[WEIGHTS_KEY][~masked] == 0).all())


def test_prompt_padding_and_special_tokens_are_never_masked():
    rows = [_row([BOS, 7, 8, 9], [11, 12, 13, EOS]), _row([BOS, 7], [14, 15, 16, 17, 18, 19, EOS, PAD])]
    collated = PaddedCollator(pad_token_id=PAD)(rows)
    seen = torch.zeros_like(collated["input_ids"], dtype=torch.bool)
    for seed in range(200):
        batch = noise_batch(collated, PLAN, torch.Generator().manual_seed(seed))
        masked = batch["input_ids"] == MASK
        assert torch.equal(masked, batch["labels"] != -100)
        assert torch.equal(batch["labels"][masked], collated["input_ids"][masked])
        assert torch.equal(batch["input_ids"][~masked], collated["input_ids"][~masked])
        seen |= masked
    answer = collated["labels"] != -100
    special = torch.isin(collated["input_ids"], torch.tensor([BOS, EOS, PAD]))
    assert torch.equal(seen, answer & ~special)  # every other answer token is masked some of the time


def test_packed_documents_get_their_own_noise_level_and_attention():
    samples = [_row([BOS, 7], list(range(10, 40))), _row([BOS, 8], list(range(20, 50))), _row([BOS], [30] * 20)]
    collated = PackedCollator(pad_token_id=PAD)([_packed(*samples), _packed(samples[0])])
    batch = noise_batch(collated, PLAN, torch.Generator().manual_seed(0))
    documents = document_ids(collated["position_ids"])
    assert documents[0].tolist() == [1] * 32 + [2] * 32 + [3] * 21
    assert documents[1].tolist() == [1] * 32 + [2] * 53  # the padding tail is a document of its own
    weights = batch[WEIGHTS_KEY][0]
    per_document = [set(weights[(documents[0] == d) & (weights > 0)].tolist()) for d in (1, 2, 3)]
    assert all(len(values) == 1 for values in per_document)  # one p per document
    assert len(set.union(*per_document)) == 3  # drawn independently
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 85, 85) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], documents[:, :, None] == documents[:, None, :])
    assert "cu_seq_lens_q" not in batch  # flash-attn's causal varlen path is never used


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_is_bidirectional_inside_a_document_and_closed_between_documents(attention):
    model = _tiny_llama(attention)
    plan = NoisePlan(MASK, (BOS, EOS, PAD), attention=attention)
    first, second = _row([BOS, 7, 8], [11, 12, 13, 14]), _row([BOS, 9], [15, 16, 17])

    def logits(row):
        batch = noise_batch(PackedCollator(pad_token_id=PAD)([row]), plan, torch.Generator().manual_seed(0))
        batch["input_ids"] = torch.tensor([row["input_ids"]])  # compare the same tokens: no noise
        with torch.no_grad():
            return model(**model_inputs(batch)).logits[0]

    base = logits(_packed(first, second))
    later_in_first = _packed(_row([BOS, 7, 8], [11, 12, 13, 40]), second)
    changed_second = _packed(first, _row([BOS, 9], [50, 51, 52]))
    assert not torch.allclose(logits(later_in_first)[1], base[1])  # an earlier token sees a later one
    torch.testing.assert_close(logits(changed_second)[:7], base[:7])  # nothing crosses into the first document
    torch.testing.assert_close(logits(_packed(first))[:7], base[:7], rtol=1e-5, atol=1e-6)


def test_loss_is_the_weighted_cross_entropy_of_masked_tokens_on_real_logits():
    model = _tiny_llama()
    model.loss_function = masked_diffusion_loss
    rows = [_packed(_row([BOS, 7, 8], list(range(10, 30))), _row([BOS, 9], list(range(30, 45)))),
            _packed(_row([BOS, 6], list(range(40, 60))))]
    batch = DiffusionCollator(PackedCollator(pad_token_id=PAD), NoisePlan(MASK, (BOS, EOS, PAD), seed=4))(rows)
    out = model(**model_inputs(batch, include_labels=True), num_items_in_batch=batch["num_label_tokens"],
                **diffusion_inputs(batch))
    expected, masked = 0.0, 0
    for b, j in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True), strict=True):
        row_logits = out.logits[b, j - 1].detach().double()  # the head one position back predicts token j
        token = batch["labels"][b, j]
        expected += float(batch[WEIGHTS_KEY][b, j]) * float(torch.logsumexp(row_logits, 0) - row_logits[token])
        masked += 1
    assert masked > 5 and batch["num_label_tokens"] == 20 + 15 + 20
    assert float(out.loss.detach()) == pytest.approx(expected / batch["num_label_tokens"], rel=1e-5)
    causal = model(**model_inputs(PackedCollator(pad_token_id=PAD)(rows), include_labels=True)).loss
    assert abs(float(out.loss.detach()) - float(causal.detach())) > 0.1  # another objective than the causal one


def test_eval_masks_are_fixed_by_the_seed_and_training_masks_are_drawn():
    rows = [_row([BOS, 7], list(range(10, 40)))] * 2
    collator = DiffusionCollator(PaddedCollator(pad_token_id=PAD), NoisePlan(MASK, (BOS, EOS, PAD), seed=42))
    assert torch.equal(collator(rows)["input_ids"], collator(rows)["input_ids"])
    training = collator.for_step(0, 0)  # a step's micro batches draw one mask after another
    assert not torch.equal(training(rows)["input_ids"], training(rows)["input_ids"])


def test_mask_token_is_the_configured_one_or_must_be_in_the_tokenizer():
    vocab = {"<unk>": 0, "<|diffusion_mask|>": 9, "<mask>": 10}
    tokenizer = SimpleNamespace(unk_token_id=0, convert_tokens_to_ids=lambda token: vocab.get(token, 0))
    model_config = SimpleNamespace(mask_token_id=None)
    assert resolve_mask_token(DiffusionSettings(), tokenizer, model_config, 12) == 9
    assert resolve_mask_token(DiffusionSettings(mask_token_str="<mask>"), tokenizer, model_config, 12) == 10
    assert resolve_mask_token(DiffusionSettings(mask_token_id=4), tokenizer, model_config, 12) == 4
    assert resolve_mask_token(DiffusionSettings(), tokenizer, SimpleNamespace(mask_token_id=11), 12) == 11
    with pytest.raises(UserError, match="mask_token_id: 12 is not a token"):
        resolve_mask_token(DiffusionSettings(mask_token_id=12), tokenizer, model_config, 12)
    with pytest.raises(UserError, match="'<m>' is not a token of the tokenizer.*additional_special_tokens"):
        resolve_mask_token(DiffusionSettings(mask_token_str="<m>"), tokenizer, model_config, 12)


def test_weightings_and_reductions():
    rows = [_row([BOS, 7], list(range(10, 40)))]
    for weighting, expected in (("linear", lambda p: 1 - p), ("none", lambda p: 1.0)):
        plan = NoisePlan(MASK, (BOS,), weighting=weighting, reduction="masked_token_mean", noise_floor=0.5)
        batch = noise_batch(PaddedCollator(pad_token_id=PAD)(rows), plan, torch.Generator().manual_seed(2))
        masked = batch["labels"] != -100
        assert batch["num_label_tokens"] == int(masked.sum()) > 0
        p = 1 - float(batch[WEIGHTS_KEY][masked][0]) if weighting == "linear" else None
        assert float(batch[WEIGHTS_KEY][masked][0]) == pytest.approx(expected(p) if p is not None else 1.0)
    settings = DiffusionSettings(importance_weighting=False, t_eps=0.2, eps=0.01)
    assert (settings.weighting, settings.noise_floor) == ("none", 0.2)
    assert DiffusionSettings(time_weighting="linear").weighting == "linear"


def _axolotl_diffusion_yaml(tmp_path, tiny_model_dir, alpaca_file) -> str:
    path = tmp_path / "diffusion.yml"
    path.write_text(f"""base_model: {tiny_model_dir}
plugins:
  - axolotl.integrations.diffusion.DiffusionPlugin
adapter: lora
lora_r: 4
lora_alpha: 8
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
attn_implementation: sdpa
sample_packing: true
sequence_len: 128
datasets:
  - path: {alpaca_file}
    type: alpaca
output_dir: {tmp_path / 'out'}
diffusion:
  from_causal_lm: false
  generate_samples: false
  eos_tail: none
""")
    return str(path)


def test_axolotl_diffusion_config_validates_and_unbuilt_settings_are_refused(capsys, tmp_path, tiny_model_dir,
                                                                             alpaca_file):
    ok = main_in_process(capsys, "validate", _axolotl_diffusion_yaml(tmp_path, tiny_model_dir, alpaca_file))
    assert ok.returncode == 0, ok.stderr
    assert "DiffusionPlugin: masked diffusion" in ok.stderr + ok.stdout
    good = Path(_axolotl_diffusion_yaml(tmp_path, tiny_model_dir, alpaca_file)).read_text()
    for old, new, message in (("generate_samples: false", "generate_samples: true", "generate_samples"),
                              ("eos_tail: none", "eos_tail: visible_supervised", "eos_tail"),
                              ("sequence_len:", "chunked_cross_entropy: true\nsequence_len:",
                               "diffusion / chunked_cross_entropy"),
                              ("attn_implementation: sdpa", "attn_implementation: flex_attention",
                               "diffusion / attention")):
        (tmp_path / "bad.yml").write_text(good.replace(old, new))
        refused = main_in_process(capsys, "validate", str(tmp_path / "bad.yml"))
        assert refused.returncode == 2, new
        assert message in refused.stderr


@pytest.mark.slow
def test_diffusion_training_runs_and_trains_another_objective(make_config, tmp_path):
    chat = tmp_path / "chat.jsonl"  # the shape of Axolotl's nemotron-diffusion smoke example
    write_jsonl([{"messages": [{"role": "user", "content": f"{row['instruction']} {row['input']}"},
                               {"role": "assistant", "content": row["output"]}]} for row in addition_rows(48)], chat)
    common = {"sample_packing": True, "sequence_len": 256, "max_steps": 2, "micro_batch_size": 2,
              "chat_template": "chatml", "attn_implementation": "sdpa", "lora_target_linear": None,
              "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "datasets": [{"path": str(chat), "type": "chat_template", "field_messages": "messages",
                            "roles_to_train": ["assistant"], "train_on_eos": "turn"}],
              "special_tokens": {"additional_special_tokens": ["<|diffusion_mask|>"]},
              "lora_modules_to_save": ["embed_tokens", "lm_head"]}
    diffusion = run_cli("train", str(make_config("diffusion.yml", output_dir=str(tmp_path / "diffusion"),
                                                 plugins=["axolotl.integrations.diffusion.DiffusionPlugin"],
                                                 diffusion={"generate_samples": False, "num_diffusion_steps": 64},
                                                 **common)))
    assert diffusion.returncode == 0, diffusion.stdout[-2000:] + diffusion.stderr[-3000:]
    assert "diffusion: masked diffusion objective; mask token" in diffusion.stdout
    assert "diffusion: num_diffusion_steps have no effect" in diffusion.stdout
    causal = run_cli("train", str(make_config("causal.yml", output_dir=str(tmp_path / "causal"),
                                              **{**common, "max_steps": 1})))
    assert causal.returncode == 0, causal.stderr[-3000:]
    losses = logged(tmp_path / "diffusion")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "diffusion" / "final" / "adapter_model.safetensors").is_file()
    assert abs(losses[0] - logged(tmp_path / "causal")[0]) > 0.05  # same rows and start, another loss
