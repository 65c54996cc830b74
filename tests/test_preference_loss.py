"""The preference objectives against their formulas written out from the papers / TRL's docs on the same
log-probs, and the per-answer log-probs of a batched forward against one sequence at a time."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from axlora.train.preference_batch import PreferenceCollator, answer_logps, split_sides
from axlora.train.preference_loss import SideLogps, dpo_loss, kto_loss, orpo_loss, simpo_loss, wpo_weights

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
