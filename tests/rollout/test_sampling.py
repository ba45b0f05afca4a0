"""The logits -> probs transform: order of operations, tie rules, dtypes, trainer log-probs, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from respec.rollout.sampling import (
    NonFiniteLogitsError,
    SamplingParams,
    check_finite,
    entropy,
    logprobs_of,
    sample,
    transform,
)



def chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit, cells with expected > 0; p-value via the upper incomplete gamma."""
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# --- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
        ("top_k", -1), ("top_k", 1.5), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", -0.5),
    ],
)
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_greedy_property_and_defaults():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.0).greedy
    assert not SamplingParams().greedy
    assert SamplingParams() == SamplingParams(temperature=1.0, top_k=0, top_p=1.0)


# --- transform semantics --------------------------------------------------------------------------


def test_temperature_only_is_a_tempered_softmax():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    out = transform(logits, SamplingParams(temperature=0.7))
    torch.testing.assert_close(out.probs, (logits / 0.7).softmax(-1))
    assert out.nucleus_size.tolist() == [7, 7, 7]


def test_top_k_is_applied_before_top_p():
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    # top-k 2 renormalizes to [4/7, 3/7]; the mass before rank 1 (4/7) is >= 0.5, so top-p keeps one.
    # (top-p first would have kept two: the mass before rank 1 is then 0.4 < 0.5.)
    out = transform(logits, SamplingParams(top_k=2, top_p=0.5), dtype=torch.float64)
    assert out.nucleus_size.item() == 1
    torch.testing.assert_close(out.probs, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    # top-k 3 -> [4/9, 3/9, 2/9]; mass before rank 2 is 7/9 >= 0.7, so two survive, renormalized
    out = transform(logits, SamplingParams(top_k=3, top_p=0.7), dtype=torch.float64)
    assert out.nucleus_size.item() == 2
    torch.testing.assert_close(out.probs, torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64))


def test_temperature_is_applied_before_top_p():
    logits = logits_of([0.6, 0.3, 0.1])
    assert transform(logits, SamplingParams(top_p=0.65)).nucleus_size.item() == 2
    # sharpened: 0.6^2 / (0.36 + 0.09 + 0.01) = 0.78 > 0.65, so one token is enough
    assert transform(logits, SamplingParams(temperature=0.5, top_p=0.65)).nucleus_size.item() == 1


@pytest.mark.parametrize("top_p, expected", [(0.25, 1), (0.2500001, 2), (0.5, 2), (0.5000001, 3), (1.0, 4)])
def test_top_p_keeps_a_token_iff_mass_strictly_before_it_is_below_p(top_p, expected):
    # equal logits: every prob is exactly 0.25, so the boundary cases are exact; ties -> lowest ids first
    out = transform(torch.zeros(4), SamplingParams(top_p=top_p), dtype=torch.float64)
    assert out.nucleus_size.item() == expected
    want = torch.zeros(4, dtype=torch.float64)
    want[:expected] = 1 / expected
    torch.testing.assert_close(out.probs, want)


def test_top_p_always_keeps_at_least_one_token():
    logits = torch.tensor([0.1, 0.3, 0.2])
    out = transform(logits, SamplingParams(top_p=1e-9))
    assert out.nucleus_size.item() == 1
    assert out.probs.tolist() == [0.0, 1.0, 0.0]


def test_top_k_ties_keep_lowest_ids_and_top_k_1_is_greedy():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    out = transform(logits, SamplingParams(top_k=2))
    assert out.probs.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0] and out.nucleus_size.item() == 2
    greedy = transform(logits, SamplingParams(temperature=0)).probs
    torch.testing.assert_close(transform(logits, SamplingParams(top_k=1)).probs, greedy)


def test_top_k_at_least_vocab_is_off():
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    full = transform(logits, SamplingParams()).probs
    torch.testing.assert_close(transform(logits, SamplingParams(top_k=5)).probs, full)
    assert transform(logits, SamplingParams(top_k=9)).nucleus_size.tolist() == [5, 5]


def test_greedy_is_one_hot_argmax_with_lowest_index_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0]]).reshape(2, 1, 4)
    out = transform(logits, SamplingParams(temperature=0, top_k=3, top_p=0.1))
    assert out.probs.shape == (2, 1, 4) and out.nucleus_size.shape == (2, 1)
    assert out.probs.argmax(-1).flatten().tolist() == [1, 0]
    assert out.probs.sum(-1).flatten().tolist() == [1.0, 1.0] and out.nucleus_size.flatten().tolist() == [1, 1]


def test_nucleus_size_counts_the_nonzero_probs():
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(2)) * 2
    for params in [SamplingParams(), SamplingParams(top_k=4), SamplingParams(top_p=0.8), SamplingParams(0.6, 5, 0.9)]:
        out = transform(logits, params)
        assert torch.equal(out.nucleus_size, (out.probs > 0).sum(-1))
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(64))


def test_dtypes_bf16_in_float32_out_and_float64_on_request():
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    out32 = transform(logits, params)
    out64 = transform(logits, params, dtype=torch.float64)
    assert out32.probs.dtype == torch.float32 and out64.probs.dtype == torch.float64
    assert out32.nucleus_size.dtype == torch.long
    torch.testing.assert_close(out32.probs.double(), out64.probs, atol=1e-6, rtol=0)
    assert logprobs_of(logits, torch.zeros(3, dtype=torch.long), params).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        transform(logits, params, dtype=torch.bfloat16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise_naming_what(bad):
    logits = torch.zeros(2, 5)
    logits[1, 3] = bad
    with pytest.raises(NonFiniteLogitsError, match="draft logits"):
        transform(logits, SamplingParams(), what="draft logits")
    with pytest.raises(ValueError, match="target"):
        check_finite(logits, "target")
    check_finite(torch.zeros(3), "fine")


# --- log-probs for the trainer --------------------------------------------------------------------


PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.9),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.8),
    SamplingParams(temperature=0),
]


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_logprobs_of_equals_log_of_transform(params):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, 13, generator=g, dtype=torch.float64) * 2
    out = transform(logits, params, dtype=torch.float64)
    tokens = sample(out.probs.reshape(-1, 13), torch.rand(24, generator=g, dtype=torch.float64)).reshape(4, 6)
    want = out.probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()  # (4, 6)
    for ns in (None, out.nucleus_size):
        got = logprobs_of(logits, tokens, params, ns, dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # every vocab entry, float32, including -inf outside the nucleus
    all_tokens = torch.arange(13).expand(4, 6, 13).permute(2, 0, 1)  # (13, 4, 6)
    got = logprobs_of(logits.float().expand(13, 4, 6, 13), all_tokens, params, out.nucleus_size.expand(13, 4, 6))
    torch.testing.assert_close(got.exp().permute(1, 2, 0), transform(logits.float(), params).probs)


def test_recorded_nucleus_keeps_a_boundary_token_finite():
    params = SamplingParams(top_p=0.795)
    engine_logits = logits_of([0.5, 0.29, 0.2, 0.01]).float()
    out = transform(engine_logits, params)
    assert out.nucleus_size.item() == 3  # mass before token 2 is 0.79 < 0.795: it is in
    trainer_logits = engine_logits.clone()
    trainer_logits[1] += 0.1  # token 1 gains mass; the ranks are unchanged
    trainer_logits.requires_grad_(True)
    token = torch.tensor(2)
    assert logprobs_of(trainer_logits, token, params).item() == -math.inf  # recomputed top-p drops it
    lp = logprobs_of(trainer_logits, token, params, out.nucleus_size)
    assert math.isfinite(lp.item())
    lp.backward()
    assert torch.isfinite(trainer_logits.grad).all() and trainer_logits.grad[3] == 0  # token 3 stays masked


def test_logprobs_of_is_differentiable():
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9)
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_(True)
    out = transform(logits.detach(), params, dtype=torch.float64)
    tokens = out.probs.argmax(-1)
    fn = lambda x: logprobs_of(x, tokens, params, out.nucleus_size, dtype=torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    greedy = logprobs_of(logits, tokens, SamplingParams(temperature=0))
    assert greedy.requires_grad and greedy.tolist() == [0.0, 0.0, 0.0]


# --- sampling -------------------------------------------------------------------------------------


def test_sample_never_picks_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0], dtype=torch.float64)
    u = torch.cat([
        torch.linspace(0, 1, 10001, dtype=torch.float64)[:-1],
        torch.tensor([0.25, 0.75, 1 - 2.0**-53], dtype=torch.float64),  # exactly on cdf steps, and the largest u
    ])
    tokens = sample(probs.expand(len(u), 8), u)
    assert (probs[tokens] > 0).all()
    assert tokens[-3:].tolist() == [4, 5, 5]  # right-side search: u on a step goes to the next token
    assert sample(probs, torch.tensor(1.0, dtype=torch.float64)).item() == 5  # u == 1: last positive token
    # unnormalized input behaves as normalized; float32 too
    torch.testing.assert_close(sample((probs * 3).float().expand(len(u), 8), u), tokens)
    # a one-hot never yields anything else, whatever u
    assert (sample(torch.eye(8)[3].expand(len(u), 8), u) == 3).all()


def test_sample_matches_probs_chi_square():
    g = torch.Generator().manual_seed(6)
    probs = transform(torch.randn(10, generator=g), SamplingParams(top_k=8)).probs  # two zeros
    n = 200_000
    tokens = sample(probs.expand(n, 10), torch.rand(n, generator=g, dtype=torch.float64))
    counts = torch.bincount(tokens, minlength=10).double()
    assert counts[probs == 0].sum() == 0
    assert chi2_pvalue(counts, probs.double() * n) > 1e-3


def test_entropy():
    torch.testing.assert_close(entropy(torch.full((2, 4), 0.25)), torch.full((2,), math.log(4)))
    assert entropy(torch.eye(3)).tolist() == [0.0, 0.0, 0.0]
