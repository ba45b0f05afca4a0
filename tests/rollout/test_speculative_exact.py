"""Speculative sampling is exactly lossless: an fp64 enumeration over a toy language model.

The headline test runs no sampling at all. A toy "language model" gives target and draft logits that
depend on the whole prefix (a fixed random table indexed by the prefix, vocab 5). For draft length
k, `spec_distribution` enumerates every draft sequence of every round, weights it by its draft probability, splits it
into "first rejection at slot j" / "all accepted" outcomes with `acceptance_probs`, draws the
emitted token from `correction_probs` (the functions verify_drafts itself uses), and recurses over
rounds until k + 1 tokens are out. The result must equal the product of the transformed target
conditionals to 1e-12. Rounds clip their draft length to the remaining budget, so rounds with
draft_len < k (bonus from slot k_b) are covered.

Four deliberately broken rules run through the same enumeration and must be caught. Separate tests
check that verify_drafts, driven by explicit uniforms, implements exactly the enumerated rule, and a
Monte-Carlo run of the full loop (drafting, keyed uniforms, verify) matches the target law.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import pytest
import torch
from torch import Tensor

from respec.rollout.rng import LANE_ACCEPT, LANE_DRAFT, LANE_SAMPLE, request_key, uniforms
from respec.rollout.sampling import SamplingParams, sample, transform
from respec.rollout.speculative import (
    acceptance_probs,
    acceptance_rate,
    correction_probs,
    expected_accept_len,
    residual_probs,
    verify_drafts,
)

V = 5  # toy vocabulary
PAD = 0  # draft token written at slots >= draft_len



def normalized(probs: Tensor) -> Tensor:
    probs = probs.double()
    return probs / probs.sum(-1, keepdim=True)


# --- a toy language model whose distributions depend on the whole prefix --------------------------


def all_sequences(length: int) -> Tensor:
    """Every token sequence of the given length, row-major: (V**length, length) long."""
    return torch.tensor(list(itertools.product(range(V), repeat=length)), dtype=torch.long).reshape(V**length, length)


def codes_of(prefixes: Tensor) -> Tensor:
    """Unique int64 code of each prefix (B, L): sum_i (t_i + 1) * (V + 1)^i; the empty prefix is 0."""
    weights = (V + 1) ** torch.arange(prefixes.shape[1])
    return ((prefixes + 1) * weights).sum(-1)


def extend(codes: Tensor, lengths: Tensor, tokens: Tensor) -> Tensor:
    """Code of prefix + [token] from the code of prefix (B,), its length (B,) and tokens (B,)."""
    return codes + (tokens + 1) * (V + 1) ** lengths


# per-prefix random numbers for every prefix of length <= 6 (enough for k = 3): codes < (V + 1)^6
TABLE = torch.rand((V + 1) ** 6, 3, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@dataclass(frozen=True)
class ToyLM:
    params: SamplingParams  # target sampling params
    draft_params: SamplingParams | None = None  # None: the same as the target's (as in the engine)
    draft: str = "noisy"  # noisy | independent | equal | eps
    dtype: torch.dtype = torch.float64

    def logits(self, codes: Tensor, lane: int) -> Tensor:  # (B,) -> (B, V) in [-3, 3)
        return 6 * TABLE[codes, lane] - 3

    def _draft_logits(self, codes: Tensor) -> Tensor:
        if self.draft == "noisy":
            return self.logits(codes, 0) + 1.5 * self.logits(codes, 1) / 3
        if self.draft == "independent":
            return self.logits(codes, 1)
        return self.logits(codes, 0)

    def target(self, codes: Tensor) -> Tensor:  # (B, V)
        return transform(self.logits(codes, 0), self.params, dtype=self.dtype).probs

    def draft_probs(self, codes: Tensor, params: SamplingParams | None = None) -> Tensor:  # (B, V)
        params = params or self.draft_params or self.params
        if self.draft == "eps":  # target + 1e-15 noise, on every token (also outside the nucleus)
            noise = TABLE[codes, 2]
            return normalized(transform(self.logits(codes, 0), params, dtype=torch.float64).probs + 1e-15 * noise)
        return transform(self._draft_logits(codes), params, dtype=self.dtype).probs

    # temperature only, no top-k/top-p: what the broken variants wrongly use
    def target_raw(self, codes: Tensor) -> Tensor:
        return transform(self.logits(codes, 0), untruncated(self.params), dtype=self.dtype).probs

    def draft_raw(self, codes: Tensor) -> Tensor:
        return self.draft_probs(codes, untruncated(self.draft_params or self.params))


def untruncated(params: SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=params.temperature)


def target_distribution(lm: ToyLM, n: int) -> Tensor:
    """Product of the target conditionals over all length-n sequences: (V,)*n float64."""
    dist = torch.ones((), dtype=torch.float64)
    for length in range(n):
        cond = normalized(lm.target(codes_of(all_sequences(length))))  # (V**length, V)
        dist = (dist.reshape(-1, 1) * cond).reshape((V,) * (length + 1))
    return dist


# --- the enumeration ------------------------------------------------------------------------------


@dataclass
class Round:
    """All draft sequences of one round from one prefix; the slot distributions are computed lazily."""

    lm: ToyLM
    codes: Tensor  # (B, k+1) code of the prefix in front of each slot
    draft_tokens: Tensor  # (B, k), PAD at slots >= draft_len
    draft_len: Tensor  # (B,)

    @cached_property
    def target(self) -> Tensor:  # (B, k+1, V)
        return torch.stack([self.lm.target(c) for c in self.codes.T], 1)

    @cached_property
    def draft(self) -> Tensor:  # (B, k, V)
        return torch.stack([self.lm.draft_probs(c) for c in self.codes.T[:-1]], 1)

    @cached_property
    def target_raw(self) -> Tensor:
        return torch.stack([self.lm.target_raw(c) for c in self.codes.T], 1)

    @cached_property
    def draft_raw(self) -> Tensor:
        return torch.stack([self.lm.draft_raw(c) for c in self.codes.T[:-1]], 1)


@dataclass(frozen=True)
class Rule:
    accept: Callable[[Round], Tensor]  # (B, k): probability each draft is accepted
    correct: Callable[[Round, Tensor], Tensor]  # n_accepted (B,) -> (B, V): law of the emitted token


EXACT = Rule(
    accept=lambda r: acceptance_probs(r.target, r.draft, r.draft_tokens),
    correct=lambda r, n: correction_probs(r.target, r.draft, n, r.draft_len),
)


def spec_distribution(lm: ToyLM, k: int, rule: Rule = EXACT) -> Tensor:
    """Exact law of the first k+1 tokens emitted by speculative rounds of draft length k: (V,)*(k+1)."""
    n = k + 1
    memo: dict[tuple[int, ...], Tensor] = {}

    def completions(prefix: tuple[int, ...]) -> Tensor:  # law of the remaining n - len(prefix) tokens
        if prefix in memo:
            return memo[prefix]
        L = len(prefix)
        kb = min(k, n - 1 - L)  # budget clipping: never draft past the last token
        drafts = all_sequences(kb)  # (B, kb) every draft sequence of this round
        B = len(drafts)
        draft_tokens = torch.cat([drafts, torch.full((B, k - kb), PAD)], 1)  # (B, k)
        codes = [codes_of(torch.tensor([prefix], dtype=torch.long).reshape(1, L)).expand(B)]
        for j in range(k):
            codes.append(extend(codes[-1], torch.tensor(L + j), draft_tokens[:, j]))
        r = Round(lm, torch.stack(codes, 1), draft_tokens, torch.full((B,), kb))
        # probability of drawing each draft sequence (sample() draws from the normalized draft probs)
        draft_at = normalized(r.draft).gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)  # (B, k)
        alive = draft_at[:, :kb].prod(-1)  # (B,) P(draft sequence), then P(it and drafts < j accepted)
        accept = rule.accept(r)  # (B, k)
        out = torch.zeros((V,) * (n - L), dtype=torch.float64)
        for j in range(kb + 1):  # outcome: drafts < j accepted, then the token at slot j is drawn
            outcome = alive * (1 - accept[:, j]) if j < kb else alive  # (B,)
            chunk = outcome[:, None] * rule.correct(r, torch.full((B,), j))  # (B, V)
            chunk = chunk.reshape((V,) * kb + (V,))  # axes: d_0 .. d_{kb-1}, emitted token
            if j < kb:  # (note: sum(dim=()) would reduce every axis)
                chunk = chunk.sum(dim=tuple(range(j, kb)))  # (V,)*(j+1): d_<j, emitted token
            if L + j + 1 == n:
                out += chunk
            else:
                for emitted in itertools.product(range(V), repeat=j + 1):
                    out[emitted] += chunk[emitted] * completions(prefix + emitted)
            if j < kb:
                alive = alive * accept[:, j]
        memo[prefix] = out
        return out

    return completions(())


CASES = {
    "t1": ToyLM(SamplingParams()),
    "t0.6": ToyLM(SamplingParams(temperature=0.6)),
    "top_p0.9": ToyLM(SamplingParams(top_p=0.9)),
    "top_k3": ToyLM(SamplingParams(top_k=3)),
    "t0.6_k3_p0.9": ToyLM(SamplingParams(temperature=0.6, top_k=3, top_p=0.9)),
    # the draft puts mass on tokens the target's top-k/top-p removed
    "draft_outside_nucleus": ToyLM(SamplingParams(top_k=2, top_p=0.8), SamplingParams(), draft="independent"),
    "draft_equals_target": ToyLM(SamplingParams(top_p=0.9), draft="equal"),  # residual mass exactly 0
    "draft_target_eps": ToyLM(SamplingParams(top_p=0.9), draft="eps"),  # residual mass ~1e-15
    "greedy": ToyLM(SamplingParams(temperature=0)),
    "greedy_target_sampled_draft": ToyLM(SamplingParams(temperature=0), SamplingParams(temperature=0.8)),
    # float32 probs, as the engine passes them: exact w.r.t. their float64 normalization
    "float32_probs": ToyLM(SamplingParams(temperature=0.8, top_p=0.9), dtype=torch.float32),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_speculative_rounds_reproduce_the_target_law_exactly(case, k):
    lm = CASES[case]
    want = target_distribution(lm, k + 1)
    got = spec_distribution(lm, k)
    assert abs(got.sum().item() - 1) < 1e-12
    assert (got - want).abs().max().item() < 1e-12


def test_cases_exercise_what_they_claim():
    root = torch.zeros(1, dtype=torch.long)
    lm = CASES["draft_outside_nucleus"]
    codes = torch.arange(200)  # many prefixes: drafts land outside the target nucleus with real mass
    outside = (lm.draft_probs(codes) > 0) & (lm.target(codes) == 0)
    assert (lm.draft_probs(codes) * outside).sum(-1).mean() > 0.1
    for name in ("draft_equals_target", "draft_target_eps"):
        lm = CASES[name]
        mass = (normalized(lm.target(codes)) - normalized(lm.draft_probs(codes))).clamp_min(0).sum(-1)
        assert mass.max() <= 1e-12  # the residual fallback is what runs
    assert CASES["greedy"].target(root).max() == 1
    lm = CASES["t0.6_k3_p0.9"]
    assert (transform(lm.logits(codes, 0), lm.params).nucleus_size < 3).any()  # top-p cuts below top-k


# --- broken rules must be caught by the same enumeration ------------------------------------------


def _rows(r: Round) -> Tensor:
    return torch.arange(len(r.draft_tokens))


def _residual_or_bonus(r: Round, n: Tensor, residual: Tensor, bonus_slot: Tensor) -> Tensor:
    bonus = (n >= r.draft_len).unsqueeze(-1)
    return torch.where(bonus, normalized(r.target[_rows(r), bonus_slot]), residual)


BROKEN = {
    # on rejection, draw from the target instead of the residual max(0, target - draft)
    "resample_from_target": (
        "t1",
        Rule(EXACT.accept, lambda r, n: normalized(r.target[_rows(r), n])),
    ),
    # residual built from the target before top-k/top-p (can emit tokens the target never would)
    "residual_from_untruncated_target": (
        "top_k3",
        Rule(EXACT.accept, lambda r, n: _residual_or_bonus(
            r, n, residual_probs(r.target_raw[_rows(r), n], r.draft[_rows(r), n.clamp_max(r.draft.shape[1] - 1)]), n)),
    ),
    # accept ratio taken against the draft's untruncated softmax, while drafts come from the truncated one
    "ratio_from_untruncated_draft": (
        "top_k3",
        Rule(lambda r: acceptance_probs(r.target, r.draft_raw, r.draft_tokens), EXACT.correct),
    ),
    # all drafts accepted with draft_len < k: bonus from the last slot k (computed on padding), not k_b
    "bonus_from_slot_k": (
        "t1",
        Rule(EXACT.accept, lambda r, n: _residual_or_bonus(
            r, n, correction_probs(r.target, r.draft, n, r.draft_len), torch.full_like(n, r.draft.shape[1]))),
    ),
}


@pytest.mark.parametrize("variant", list(BROKEN))
def test_broken_variant_is_detected(variant):
    case, rule = BROKEN[variant]
    lm = CASES[case]
    want = target_distribution(lm, 3)
    assert (spec_distribution(lm, 2, EXACT) - want).abs().max() < 1e-12  # the harness passes the real rule
    assert (spec_distribution(lm, 2, rule) - want).abs().max() > 1e-3


# --- verify_drafts implements the enumerated rule -------------------------------------------------


def random_round(B: int, k: int, seed: int, params: SamplingParams):
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(B, k + 1, 6, generator=g) * 1.5
    draft_logits = target_logits[:, :k] + torch.randn(B, k, 6, generator=g)
    target_probs = transform(target_logits, params).probs  # float32, as in the engine
    draft_probs = transform(draft_logits, params).probs
    draft_tokens = sample(draft_probs, torch.rand(B, k, generator=g, dtype=torch.float64))
    draft_len = torch.randint(0, k + 1, (B,), generator=g)
    draft_tokens = torch.where(torch.arange(k) < draft_len[:, None], draft_tokens, -1)  # padding
    return target_probs, draft_probs, draft_tokens, draft_len, g


def reference_verdict(target_probs, draft_probs, draft_tokens, draft_len, u_accept, u_resample):
    """verify_drafts written out row by row, straight from the math (independent of the module)."""
    out = []
    for b in range(len(draft_tokens)):
        t, d = normalized(target_probs[b]), normalized(draft_probs[b])
        n = 0
        while n < draft_len[b] and u_accept[b, n] * d[n, draft_tokens[b, n]] < t[n, draft_tokens[b, n]]:
            n += 1
        if n < draft_len[b]:
            law = (t[n] - d[n]).clamp_min(0)
            law = law / law.sum() if law.sum() > 1e-12 else t[n]
        else:
            law = t[n]
        cdf = law.cumsum(0)
        token = next(i for i in range(len(cdf)) if cdf[i] > u_resample[b] * cdf[-1])
        out.append(draft_tokens[b, :n].tolist() + [token])
    return out


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)], ids=str)
def test_verify_drafts_matches_the_rule_with_explicit_uniforms(params):
    B, k = 256, 3
    target_probs, draft_probs, draft_tokens, draft_len, g = random_round(B, k, 0, params)
    u_accept = torch.rand(B, k, generator=g, dtype=torch.float64)
    u_resample = torch.rand(B, generator=g, dtype=torch.float64)
    v = verify_drafts(target_probs, draft_probs, draft_tokens, u_accept, u_resample, draft_len)
    want = reference_verdict(target_probs, draft_probs, draft_tokens, draft_len, u_accept, u_resample)
    assert v.n_accepted.tolist() == [len(w) - 1 for w in want]
    assert torch.equal(v.n_emitted, v.n_accepted + 1)
    for b in range(B):
        assert v.tokens[b].tolist() == want[b] + [-1] * (k + 1 - len(want[b]))
    assert (v.n_accepted < draft_len).any() and (v.n_accepted == draft_len).any() and (draft_len < k).any()

    # acceptance is exactly "u < min(1, target/draft)", i.e. acceptance_probs
    alpha = acceptance_probs(target_probs, draft_probs, draft_tokens)
    first = draft_len > 0
    torch.testing.assert_close((v.n_accepted > 0)[first], (u_accept[:, 0] < alpha[:, 0])[first], rtol=0, atol=0)

    # u_resample (B, k+1) is read at column n_accepted; other columns are ignored
    wide = torch.rand(B, k + 1, generator=g, dtype=torch.float64).scatter(1, v.n_accepted[:, None], u_resample[:, None])
    again = verify_drafts(target_probs, draft_probs, draft_tokens, u_accept, wide, draft_len)
    assert torch.equal(again.tokens, v.tokens)

    # moving u_accept inside its accept/reject region changes nothing: only u_resample draws the token
    accepted = u_accept * normalized(draft_probs).gather(-1, draft_tokens.clamp_min(0)[..., None]).squeeze(-1) < (
        normalized(target_probs[:, :k]).gather(-1, draft_tokens.clamp_min(0)[..., None]).squeeze(-1))
    moved = torch.where(accepted, u_accept * 0.5, (1 + u_accept) / 2)
    again = verify_drafts(target_probs, draft_probs, draft_tokens, moved, u_resample, draft_len)
    assert torch.equal(again.tokens, v.tokens)


def test_accept_test_is_strict_and_division_free():
    # target(d) = 0.25, draft(d) = 0.5: accepted iff u * 0.5 < 0.25, i.e. u < 0.5 (u = 0.5 rejects)
    target = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], dtype=torch.float64).expand(3, 2, 2)
    draft = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64).expand(3, 1, 2)
    tokens = torch.zeros(3, 1, dtype=torch.long)
    u = torch.tensor([[0.5 - 2**-52], [0.5], [0.9]], dtype=torch.float64)
    v = verify_drafts(target, draft, tokens, u, torch.full((3,), 0.3, dtype=torch.float64))
    assert v.n_accepted.tolist() == [1, 0, 0]
    assert v.tokens[1:, 0].tolist() == [1, 1]  # the residual [0, 0.25] -> token 1 whatever u_resample


def test_resample_law_on_a_uniform_grid():
    """Sweeping u_resample over a fine grid reproduces the residual (rejected rows) / bonus-slot law."""
    target_probs, draft_probs, draft_tokens, draft_len, g = random_round(8, 3, 1, SamplingParams(top_k=5))
    draft_len = torch.tensor([3, 3, 2, 2, 1, 1, 0, 0])
    M = 4096
    grid = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    u_accept = torch.tensor([[0.0, 0.0, 1 - 2**-52]] * 4 + [[0.0, 0.0, 0.0]] * 4, dtype=torch.float64)
    rep = lambda x: x.repeat_interleave(M, 0)  # noqa: E731
    v = verify_drafts(
        rep(target_probs), rep(draft_probs), rep(draft_tokens), rep(u_accept), grid.repeat(8), rep(draft_len)
    )
    n_acc = v.n_accepted.reshape(8, M)
    assert (n_acc == n_acc[:, :1]).all()  # the accept decisions depend on u_accept only
    n_acc = n_acc[:, 0]
    token = v.tokens.reshape(8, M, 4).gather(2, n_acc[:, None, None].expand(8, M, 1)).squeeze(-1)  # (8, M)
    freq = torch.stack([torch.bincount(t, minlength=6) for t in token]).double() / M
    law = correction_probs(target_probs, draft_probs, n_acc, draft_len)
    assert (freq - law).abs().max() <= 1.0 / M + 1e-12
    for b in range(8):
        if n_acc[b] == draft_len[b]:  # bonus: target slot k_b, not slot k
            torch.testing.assert_close(law[b], normalized(target_probs[b, draft_len[b]]))
        else:
            torch.testing.assert_close(law[b], residual_probs(target_probs[b, n_acc[b]], draft_probs[b, n_acc[b]]))
    assert (n_acc < draft_len).any() and ((n_acc == draft_len) & (draft_len < 3)).any()


def test_greedy_needs_no_special_case():
    g = torch.Generator().manual_seed(2)
    B, k = 64, 3
    target_logits = torch.randn(B, k + 1, 7, generator=g)
    greedy = SamplingParams(temperature=0)
    target_probs = transform(target_logits, greedy).probs
    target_argmax = target_logits.argmax(-1)  # (B, k+1)
    # drafts equal the target's argmax on a random prefix of slots, then differ
    agree = torch.randint(0, k + 1, (B,), generator=g)
    draft_tokens = torch.where(torch.arange(k) < agree[:, None], target_argmax[:, :k], (target_argmax[:, :k] + 1) % 7)
    draft_probs = torch.nn.functional.one_hot(draft_tokens, 7).float()
    for _ in range(3):
        u_accept = torch.rand(B, k, generator=g, dtype=torch.float64) * (1 - 2**-52)
        u_resample = torch.rand(B, generator=g, dtype=torch.float64)
        v = verify_drafts(target_probs, draft_probs, draft_tokens, u_accept, u_resample)
        assert torch.equal(v.n_accepted, agree)
        for b in range(B):
            assert v.tokens[b, : agree[b] + 1].tolist() == target_argmax[b, : agree[b] + 1].tolist()


# --- the full loop, sampled: drafting + keyed uniforms + verify_drafts ------------------------------


def run_loop(lm: ToyLM, k: int, n: int, keys: Tensor) -> Tensor:
    """Batched speculative generation of n tokens per row with rounds of <= k drafts: (M, n) tokens."""
    M = len(keys)
    tokens = torch.full((M, n), -1)
    codes = torch.zeros(M, dtype=torch.long)
    length = torch.zeros(M, dtype=torch.long)
    while (length < n).any():
        rows = (length < n).nonzero().squeeze(1)
        L, key = length[rows], keys[rows]
        kb = (n - 1 - L).clamp_max(k)  # (R,) budget clipping
        slot_codes, draft_tokens, draft_probs = [codes[rows]], [], []
        for j in range(k):
            probs = lm.draft_probs(slot_codes[-1])  # (R, V)
            d = torch.where(j < kb, sample(probs, uniforms(key, L + j, LANE_DRAFT)), PAD)
            draft_probs.append(probs)
            draft_tokens.append(d)
            slot_codes.append(extend(slot_codes[-1], L + j, d))
        target_probs = torch.stack([lm.target(c) for c in slot_codes], 1)  # (R, k+1, V)
        positions = L[:, None] + torch.arange(k + 1)  # (R, k+1) the position each slot's token would take
        v = verify_drafts(
            target_probs,
            torch.stack(draft_probs, 1) if k else torch.empty(len(rows), 0, V),
            torch.stack(draft_tokens, 1) if k else torch.empty(len(rows), 0, dtype=torch.long),
            u_accept=uniforms(key, positions[:, :k], LANE_ACCEPT),
            u_resample=uniforms(key, positions, LANE_SAMPLE),
            draft_len=kb,
        )
        for c in range(k + 1):
            emit = c < v.n_emitted
            r, t = rows[emit], v.tokens[emit, c]
            tokens[r, length[r]] = t
            codes[r] = extend(codes[r], length[r], t)
            length[r] += 1
    return tokens


def test_sampled_loop_matches_target_law_and_zero_drafts_is_plain_sampling():
    lm = ToyLM(SamplingParams(temperature=0.8, top_p=0.9))
    n, M = 3, 20_000
    keys = torch.tensor([request_key(0, i, 0) for i in range(M)])
    spec = run_loop(lm, 2, n, keys)
    cells = (spec * V ** torch.arange(n - 1, -1, -1)).sum(-1)  # row-major sequence index
    counts = torch.bincount(cells, minlength=V**n).double()
    expected = target_distribution(lm, n).flatten() * M
    assert counts[expected == 0].sum() == 0
    big = expected >= 5  # pool the sparse cells so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    assert torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2) > 1e-3

    # k = 0: every round is one LANE_SAMPLE draw at the token's position, i.e. a plain sampling step
    plain = torch.full((M, n), -1)
    codes = torch.zeros(M, dtype=torch.long)
    for pos in range(n):
        plain[:, pos] = sample(lm.target(codes), uniforms(keys, torch.full((M,), pos), LANE_SAMPLE))
        codes = extend(codes, torch.tensor(pos), plain[:, pos])
    assert torch.equal(run_loop(lm, 0, n, keys), plain)


# --- small helpers --------------------------------------------------------------------------------


def test_acceptance_rate_and_expected_accept_len():
    target = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    draft = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(acceptance_rate(target, draft), torch.tensor([0.5, 1.0], dtype=torch.float64))
    alpha = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(expected_accept_len(alpha), torch.tensor([1.875, 4.0, 1.0], dtype=torch.float64))
    # alpha is the draft-weighted mean of acceptance_probs: sum_d draft(d) min(1, target(d) / draft(d))
    lm = CASES["top_k3"]
    root = torch.zeros(1, dtype=torch.long)
    target, draft = lm.target(root), lm.draft_probs(root)  # (1, V)
    per_token = acceptance_probs(target.expand(V, 1, V), draft.expand(V, 1, V), torch.arange(V)[:, None])  # (V, 1)
    alpha = acceptance_rate(target, draft)  # (1,)
    assert 0 < alpha.item() < 1
    torch.testing.assert_close((draft[0] * per_token[:, 0]).sum(), alpha[0], atol=1e-15, rtol=0)
