"""The preference objectives against their formulas written out from the papers / TRL's docs on the same
log-probs, the per-answer log-probs of a batched forward against one sequence at a time, and KTO's objective
(its KL estimate included) against the formula on a LoRA's log-probs computed one sequence at a time."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from axlora.config.schema import Config
from axlora.data.preference_tokens import attach_mismatched_completions
from axlora.train.preference_batch import PreferenceCollator, answer_logps, split_sides
from axlora.train.preference_loss import SideLogps, dpo_loss, kto_loss, orpo_loss, simpo_loss, wpo_weights
from axlora.train.preference_step import PreferenceObjective

# per pair: policy chosen, policy rejected, reference chosen, reference rejected (summed), and token counts
PAIRS = [(-12.0, -15.0, -13.0, -14.0, 4, 6), (-20.5, -9.25, -19.0, -10.0, 8, 3), (-3.0, -3.0, -3.0, -3.0, 2, 2)]


def sides(index_logps, index_tokens):
    return SideLogps(torch.tensor([p[index_logps] for p in PAIRS], dtype=torch.float64),
                     torch.tensor([p[index_tokens] for p in PAIRS]))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def inputs():
    return sides(0, 4), sides(1, 5), sides(2, 4), sides(3, 5)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                                   ("robust", 0.1), ("ipo", 0.0)])
def test_dpo_family(loss_type, smoothing):
    beta = 0.3
    result = dpo_loss(*inputs(), beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    for index, (pc, pr, rc, rr, nc, nr) in enumerate(PAIRS):
        u = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":  # Rafailov et al., eq. 7; conservative DPO with label smoothing
            want = -(1 - smoothing) * log_sigmoid(beta * u) - smoothing * log_sigmoid(-beta * u)
        elif loss_type == "hinge":  # SLiC
            want = max(0.0, 1 - beta * u)
        elif loss_type == "robust":  # Chowdhury et al., eq. 6
            want = ((1 - smoothing) * -log_sigmoid(beta * u) + smoothing * log_sigmoid(-beta * u)) / (1 - 2 * smoothing)
        else:  # Azar et al.: squared distance of the length-normalized log-ratio to 1/(2 beta)
            want = ((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * beta)) ** 2
        assert result.loss[index].item() == pytest.approx(want, rel=1e-12)
        assert result.chosen_rewards[index].item() == pytest.approx(beta * (pc - rc))
        assert result.rejected_rewards[index].item() == pytest.approx(beta * (pr - rr))


def test_dpo_is_ln2_when_policy_is_reference():
    chosen, rejected, _, _ = inputs()
    result = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    assert torch.allclose(result.loss, torch.full((3,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)


def test_simpo_and_orpo():
    chosen, rejected, _, _ = inputs()
    beta, gamma, alpha = 2.0, 0.5, 0.7
    simpo = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, cpo_alpha=alpha)
    orpo = orpo_loss(chosen, rejected, alpha=alpha)
    for index, (pc, pr, _, _, nc, nr) in enumerate(PAIRS):
        ac, ar = pc / nc, pr / nr
        # Meng et al., eq. 6 (TRL: gamma is simpo_gamma in reward units), plus CPO's NLL of the chosen answer
        assert simpo.loss[index].item() == pytest.approx(-log_sigmoid(beta * (ac - ar) - gamma) - alpha * ac)
        # Hong et al., eq. 6-8: odds = p / (1 - p) with p the length-normalized likelihood
        log_odds = math.log(math.exp(ac) / (1 - math.exp(ac))) - math.log(math.exp(ar) / (1 - math.exp(ar)))
        assert orpo.loss[index].item() == pytest.approx(-ac - alpha * log_sigmoid(log_odds), rel=1e-9)
        assert orpo.chosen_rewards[index].item() == pytest.approx(alpha * ac)


def test_kto_and_wpo_weights():
    chosen, _, ref, _ = inputs()
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor(0.4, dtype=torch.float64)
    result = kto_loss(chosen, ref, desirable, kl, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    for index, (pc, _, rc, _, _, _) in enumerate(PAIRS):
        r = pc - rc  # Ethayarajh et al., eq. 8 with TRL's weights
        sig = 1 / (1 + math.exp(-0.5 * ((r - 0.4) if desirable[index] else (0.4 - r))))
        assert result.loss[index].item() == pytest.approx((1.0 if desirable[index] else 1.5) * (1 - sig))
    weights = wpo_weights(torch.tensor([0.3, -2.0]), torch.tensor([0.1, -1.0]))
    assert weights.tolist() == pytest.approx([1.0, math.exp(-3.0)])


def test_batched_answers_match_one_sequence_at_a_time(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [{"prompt_ids": [1, 40, 41, 42], "chosen_ids": [50, 51], "rejected_ids": [60, 61, 62, 63]},
            {"prompt_ids": [1, 43], "chosen_ids": [52, 53, 54], "rejected_ids": [64]}]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch.input_ids.shape == (4, 8) and batch.pairs == 2
    with torch.no_grad():
        chosen, rejected = split_sides(answer_logps(model, batch, "cpu")[0], 2)
        for index, row in enumerate(rows):
            for side, got in (("chosen_ids", chosen), ("rejected_ids", rejected)):
                ids = torch.tensor([row["prompt_ids"] + row[side]])
                log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                want = sum(log_probs[len(row["prompt_ids"]) - 1 + k, token].item() for k, token in enumerate(row[side]))
                assert got.logps[index].item() == pytest.approx(want, abs=1e-4)
                assert got.tokens[index].item() == len(row[side])


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def kto_rows():
    rows = [{"prompt_ids": [1, 40, 41], "chosen_ids": [50, 51], "label": True},
            {"prompt_ids": [1, 42, 43, 44], "chosen_ids": [52], "label": False},
            {"prompt_ids": [1, 45], "chosen_ids": [53, 54, 55], "label": False},
            {"prompt_ids": [1, 46, 47], "chosen_ids": [56, 57], "label": True}]
    attach_mismatched_completions(rows, sequence_len=16)
    return rows


def kto_config(**keys) -> Config:
    return Config(base_model="axlora:tiny-llama", lora_target_linear=True, max_steps=1, rl="kto",
                  datasets=[{"path": "k.jsonl", "type": "chatml.ultra"}], **keys)


def test_kto_objective_against_its_formula_on_a_lora(tiny_model_dir, accelerator):
    """TRL's KTO on the same log-probs, written out: z0 is the mean over the whole step (both micro batches here)
    of policy minus reference on prompts paired with another row's completion, at least 0; the reference is the
    model with its adapter disabled."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # policy != reference
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).eval()
    rows, collate = kto_rows(), PreferenceCollator(pad_token_id=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # the adapter learns the mismatched completions, so that z0 > 0 (not clamped)
        optimizer.zero_grad()
        (-answer_logps(model, collate(rows).mismatched, "cpu")[0].logps.sum()).backward()
        optimizer.step()
    beta, weights = 0.3, {True: 1.2, False: 0.7}
    objective = PreferenceObjective(kto_config(rl_beta=beta, kto_desirable_weight=1.2, kto_undesirable_weight=0.7),
                                    disabled_adapter=model.disable_adapter)
    passes = [(collate(rows[:3]), 1.0), (collate(rows[3:]), 1.0), (collate(rows[:1]), 0.0)]  # a filler pass
    with torch.no_grad():
        kl = objective.kl_estimate(model, accelerator, passes)
        losses = torch.cat([objective.pair_losses(model, batch, "cpu", kl)[0] for batch, _ in passes[:2]])

    def logp(prompt, answer, adapter):
        with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
            log_probs = model(input_ids=torch.tensor([prompt + answer])).logits[0, :-1].log_softmax(-1)
        return sum(log_probs[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer))

    z0 = max(0.0, sum(logp(r["prompt_ids"], r["kl_ids"], True) - logp(r["prompt_ids"], r["kl_ids"], False)
                      for r in rows) / len(rows))
    assert z0 > 0.1 and kl.item() == pytest.approx(z0, abs=1e-5)
    for row, got in zip(rows, losses, strict=True):
        reward = logp(row["prompt_ids"], row["chosen_ids"], True) - logp(row["prompt_ids"], row["chosen_ids"], False)
        margin = reward - z0 if row["label"] else z0 - reward
        want = weights[row["label"]] * (1 - 1 / (1 + math.exp(-beta * margin)))
        assert got.item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("shift, want", [(2.0, 2.0), (-5.0, 0.0)])
def test_kto_kl_estimate_is_clamped_at_zero(tiny_model_dir, accelerator, shift, want):
    """With precomputed reference log-probs: z0 = max(0, mean(policy - reference)) on the mismatched pairs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows, collate = kto_rows(), PreferenceCollator(pad_token_id=0)
    for row in rows:
        with torch.no_grad():
            mine = answer_logps(model, collate([row]).mismatched, "cpu")[0].logps.item()
        row["ref_logps"] = [0.0, mine - shift]
    kl = PreferenceObjective(kto_config()).kl_estimate(model, accelerator, [(collate(rows), 1.0)])
    assert kl.item() == pytest.approx(want, abs=1e-4)
