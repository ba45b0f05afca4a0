"""Advantages and the policy loss against values computed by hand on small examples."""

from __future__ import annotations

import math

import pytest
import torch

from respec.rl.advantages import compute_advantages, dr_grpo_advantages, grpo_advantages
from respec.rl.loss import merge_stats, policy_loss

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0],   # mean 0.5, unbiased std sqrt(1/3)
                        [1.0, 1.0, 1.0, 1.0],   # zero variance
                        [0.0, 0.5, 1.0, 0.5]])  # mean 0.5, unbiased std sqrt(1/6)


def test_grpo_advantages_by_hand():
    adv = grpo_advantages(REWARDS, eps=0.0)
    a, b = 0.5 / math.sqrt(1 / 3), 0.5 / math.sqrt(1 / 6)
    expected = torch.tensor([[a, -a, -a, a], [0, 0, 0, 0], [-b, 0, b, 0]])
    torch.testing.assert_close(adv.values, expected)
    assert adv.zero_std_fraction == pytest.approx(1 / 3)
    # eps is added to the std
    torch.testing.assert_close(grpo_advantages(REWARDS, eps=0.1).values[0, 0], torch.tensor(0.5 / (math.sqrt(1 / 3) + 0.1)))


def test_dr_grpo_advantages_by_hand():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.5, 0, 0.5, 0]])
    torch.testing.assert_close(dr_grpo_advantages(REWARDS).values, expected)
    torch.testing.assert_close(compute_advantages(REWARDS, "dr_grpo", scale=2.0).values, expected / 2)
    assert dr_grpo_advantages(REWARDS).zero_std_fraction == pytest.approx(1 / 3)


def test_zero_variance_groups_are_exactly_zero_despite_rounding():
    r = torch.full((2, 3), 0.1)  # the float mean of [0.1] * 3 is not exactly 0.1
    adv = grpo_advantages(r, eps=1e-12)
    assert adv.values.abs().max().item() == 0.0 and adv.zero_std_fraction == 1.0


def test_advantages_refuse_bad_shapes_and_names():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages(REWARDS, "ppo")


# --- loss: two sequences, old log-probs 0, new log-probs = log(ratio) --------------------------------
RATIOS = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 7.0]])  # row 1's last slot is padding
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -2.0])
# clip range [0.8, 1.2]: per-token -min(r A, clip(r) A)
#   row 0 (A = +1): 1.5 -> -1.2 (clipped), 0.9 -> -0.9, 1.0 -> -1.0
#   row 1 (A = -2): 0.5 -> +1.6 (clipped: min(-1.0, -1.6)), 1.1 -> +2.2
PER_TOKEN = [[-1.2, -0.9, -1.0], [1.6, 2.2]]


def run_loss(**kw):
    lp = RATIOS.log().requires_grad_(True)
    loss, stats = policy_loss(lp, torch.zeros(2, 3), ADV, MASK, clip_low=0.2, clip_high=0.2, **kw)
    loss.backward()
    return loss, stats, lp.grad


@pytest.mark.parametrize("aggregation, expected", [
    ("token", (-3.1 + 3.8) / 5),                  # sum / total tokens
    ("sequence", (-3.1 / 3 + 3.8 / 2) / 2),       # mean per sequence, then mean
    ("constant", (-3.1 + 3.8) / (2 * 4)),         # sum / (sequences * max_len)
])
def test_loss_aggregations_by_hand(aggregation, expected):
    loss, stats, grad = run_loss(aggregation=aggregation, max_len=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.tokens == 5
    assert stats.clip_fraction == pytest.approx(2 / 5)
    assert stats.ratio_mean == pytest.approx((1.5 + 0.9 + 1.0 + 0.5 + 1.1) / 5)
    assert stats.ratio_max == pytest.approx(1.5)  # padding's 7.0 is ignored
    assert stats.kl_ref is None
    # clipped tokens and padding get no gradient; unclipped: d/dlp of -r A / denom = -r A / denom
    assert grad[0, 0] == 0 and grad[1, 0] == 0 and grad[1, 2] == 0
    if aggregation == "token":
        assert grad[0, 1].item() == pytest.approx(-0.9 / 5)
        assert grad[1, 1].item() == pytest.approx(2 * 1.1 / 5)


def test_asymmetric_clip_range():
    # clip_high 0.6 lets 1.5 through unclipped: row 0 becomes -1.5, -0.9, -1.0
    lp = RATIOS.log()
    loss, stats = policy_loss(lp, torch.zeros(2, 3), ADV, MASK, clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx((-3.4 + 3.8) / 5, abs=1e-6)
    assert stats.clip_fraction == pytest.approx(1 / 5)


def test_k3_kl_penalty_by_hand():
    ref = torch.zeros(2, 3)  # reference = old policy; k3 = exp(ref - lp) - (ref - lp) - 1 = 1/r + log r - 1
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 0.9, 1.0, 0.5, 1.1)]
    loss, stats, _ = run_loss(aggregation="token", kl_beta=0.5, ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.7 / 5 + 0.5 * sum(k3) / 5, abs=1e-6)
    assert stats.kl_ref == pytest.approx(sum(k3) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(RATIOS.log(), torch.zeros(2, 3), ADV, MASK, kl_beta=0.1)


def test_accumulated_micro_batches_equal_the_whole_minibatch():
    lp, old = RATIOS.log(), torch.zeros(2, 3)
    for agg in ("token", "sequence", "constant"):
        whole, s_whole = policy_loss(lp, old, ADV, MASK, aggregation=agg, max_len=4)
        parts = [policy_loss(lp[i : i + 1], old[i : i + 1], ADV[i : i + 1], MASK[i : i + 1], aggregation=agg,
                             num_tokens=5, num_sequences=2, max_len=4) for i in range(2)]
        assert sum(p[0].item() for p in parts) == pytest.approx(whole.item(), abs=1e-6)
        merged = merge_stats([p[1] for p in parts])
        assert merged.clip_fraction == pytest.approx(s_whole.clip_fraction)
        assert merged.ratio_mean == pytest.approx(s_whole.ratio_mean)
        assert merged.ratio_max == s_whole.ratio_max and merged.tokens == 5


def test_stats_report_entropy_and_engine_gap():
    lp = RATIOS.log()
    engine = lp + torch.tensor([[0.0, 1e-3, -2e-3], [0.0, 0.0, 5.0]])  # padding's 5.0 ignored
    _, stats = policy_loss(lp, torch.zeros(2, 3), ADV, MASK, entropy=torch.full((2, 3), 0.7), engine_logprobs=engine)
    assert stats.entropy == pytest.approx(0.7)
    assert stats.logprob_gap_max == pytest.approx(2e-3, rel=1e-3)
    assert stats.logprob_gap_mean == pytest.approx(3e-3 / 5, rel=1e-3)
