"""End-to-end losslessness of the speculative engine (fp32, fixed seeds, never re-seeded to pass).

Pooled test: many ragged rows are generated speculatively with an imperfect drafter; the target is
then teacher-forced over every finished sequence to get the exact (transformed) distribution behind
each emitted token. Each token is scored two ways, stratified by its slot within its verify round:
  * rank test: counts of "the emitted token was the r-th most likely" vs their expected counts;
  * PIT test: the randomized probability-integral transform F(x-) + v p(x) in token-id order is
    exactly Uniform(0,1) for a correctly sampled token; 10 equal bins.
Pearson chi-square, alpha = 1e-3. Deliberately broken samplers must fail the same tests.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from respec.bench.lossless import ALPHA, K, pearson, perturbed, pooled_pvalues, run_pooled, tiny_lm
from respec.drafter import DraftModelDrafter
from respec.rollout import engine as engine_mod
from respec.rollout import rng, speculative
from respec.rollout.engine import SOURCE_ACCEPTED, SOURCE_BONUS, SOURCE_RESAMPLED, Engine, Request, StaticK
from respec.rollout.sampling import SamplingParams, logprobs_of, transform

SETTINGS = {
    "t1": SamplingParams(1.0),
    "t0.7_p0.9_k8": SamplingParams(0.7, top_k=8, top_p=0.9),
}


@pytest.fixture(scope="module")
def models():
    target = tiny_lm(0)
    return target, perturbed(target, 0.08, 1)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_pooled_speculative_samples_fit_the_target(models, name):
    target, draft = models
    sampling = SETTINGS[name]
    res, rows = run_pooled(target, DraftModelDrafter(draft), sampling)
    # enough accepts, rejects and bonus tokens at every slot: a drafter that is always rejected
    # (or always accepted) cannot pass this vacuously
    for slot in range(K):
        assert sum(1 for _, _, s, src, _ in rows if s == slot and src == SOURCE_ACCEPTED) >= 60
        assert sum(1 for _, _, s, src, _ in rows if s == slot and src == SOURCE_RESAMPLED) >= 60
    assert sum(1 for _, _, s, src, _ in rows if s == K and src == SOURCE_BONUS) >= 60
    assert all(len(r.token_ids) >= 2 * (K + 1) for r in res.rollouts)
    pvals = pooled_pvalues(rows)
    assert min(pvals.values()) > ALPHA, pvals
    # recorded log-probs are the log of the distribution each token was drawn from (no extra forward)
    gap = max(abs(lp - math.log(p[t].item())) for p, t, _, _, lp in rows)
    assert gap < 1e-5, gap


@contextlib.contextmanager
def broken(variant: str):
    """Deliberately wrong samplers, patched into the engine's collaborators."""
    mp = pytest.MonkeyPatch()
    if variant == "resample_from_target":
        mp.setattr(speculative, "residual_probs", lambda target_slot, draft_slot: target_slot.double())
    elif variant == "reuse_accept_uniform":
        real = rng.uniforms

        def uniforms(keys, positions, lane):  # the resample reuses the accept test's uniform
            lane = torch.as_tensor(lane)
            return real(keys, positions, torch.where(lane == rng.LANE_SAMPLE, rng.LANE_ACCEPT, lane))

        mp.setattr(engine_mod.rng, "uniforms", uniforms)
    elif variant == "bonus_from_slot_k":
        real_corr = speculative.correction_probs

        def correction(target_probs, draft_probs, n_accepted, draft_len):
            k = draft_probs.shape[1]
            return real_corr(target_probs, draft_probs, n_accepted, torch.full_like(draft_len, k))

        mp.setattr(speculative, "correction_probs", correction)
    try:
        yield
    finally:
        mp.undo()


@pytest.mark.parametrize("variant", ["resample_from_target", "reuse_accept_uniform"])
def test_broken_samplers_are_rejected(models, variant):
    target, draft = models
    with broken(variant):
        _, rows = run_pooled(target, DraftModelDrafter(draft), SETTINGS["t1"])
    pvals = pooled_pvalues(rows)
    assert min(pvals.values()) < ALPHA, pvals


def test_stop_token_inside_accepted_drafts_ends_the_row(models, monkeypatch):
    target, draft = models
    eos = (5,)
    res, _ = run_pooled(target, DraftModelDrafter(draft), SETTINGS["t1"], n_rows=64, eos=eos)
    stopped = [r for r in res.rollouts if r.finish_reason == "stop"]
    assert len(stopped) > 20
    assert any(r.sources[-1] == SOURCE_ACCEPTED for r in stopped)  # stops that came from an accepted draft
    for r in res.rollouts:
        assert 5 not in r.token_ids[:-1]
        assert (r.token_ids[-1] == 5) == (r.finish_reason == "stop")
    # the broken variant (stop ignored inside accepted drafts) is caught by the same assertions
    monkeypatch.setattr(engine_mod, "truncate_at_stop",
                        lambda toks, n_emit, eos_t: (n_emit, torch.isin(toks.gather(1, (n_emit - 1)[:, None])[:, 0], eos_t)))
    res_b, _ = run_pooled(target, DraftModelDrafter(draft), SETTINGS["t1"], n_rows=64, eos=eos)
    assert any(5 in r.token_ids[:-1] for r in res_b.rollouts)


def test_joint_distribution_of_first_two_tokens():
    """16-token model, one prompt sampled 6000 times: the (t1, t2) table fits p(t1) p(t2 | t1)."""
    target = tiny_lm(3, std=0.3, vocab=16)
    draft = perturbed(target, 0.08, 4)
    sampling = SamplingParams(1.0)
    eng = Engine(target, drafter=DraftModelDrafter(draft), policy=StaticK(K), max_batch=128, seed=11)
    prompt = (3, 7, 1)
    res = eng.generate([Request("joint", prompt, s, 2) for s in range(6000)], sampling)
    with torch.no_grad():
        p1 = transform(target(torch.tensor([prompt])).logits[0, -1].double(), sampling).probs  # (16,)
        seqs = torch.tensor([list(prompt) + [t] for t in range(16)])
        p2 = transform(target(seqs).logits[:, -1].double(), sampling).probs  # (16, 16)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.zeros(256, dtype=torch.float64)
    for r in res.rollouts:
        counts[r.token_ids[0] * 16 + r.token_ids[1]] += 1
    order = joint.argsort(descending=True)
    assert pearson(counts[order], joint[order] * len(res.rollouts)) > ALPHA


def test_random_drafter_changes_speed_not_distribution(models):
    """A random-weight drafter (acceptance near chance) under static k: same law as the target."""
    target, _ = models
    res, rows = run_pooled(target, DraftModelDrafter(tiny_lm(99, std=0.5)), SETTINGS["t1"], n_rows=128)
    assert min(pooled_pvalues(rows).values()) > ALPHA


def test_logprobs_equal_teacher_forced_recomputation_with_recorded_nucleus(models):
    target, draft = models
    sampling = SamplingParams(0.6, top_p=0.9)
    res, _ = run_pooled(target, DraftModelDrafter(draft), sampling, n_rows=64)
    kinds = set()
    worst = 0.0
    with torch.no_grad():
        for r in res.rollouts:
            seq = torch.tensor(list(r.request.prompt_ids) + r.token_ids)
            P = len(r.request.prompt_ids)
            logits = target(seq[None]).logits[0, P - 1 : P - 1 + len(r.token_ids)]
            lp = logprobs_of(logits, torch.tensor(r.token_ids), sampling, torch.tensor(r.nucleus_sizes))
            worst = max(worst, (lp.double() - torch.tensor(r.logprobs, dtype=torch.float64)).abs().max().item())
            kinds.update(r.sources)
    assert {SOURCE_ACCEPTED, SOURCE_RESAMPLED, SOURCE_BONUS} <= kinds
    assert worst < 1e-5, worst


class Alternating:
    """Forced plain/speculative switches: k cycles 0, 3, 1, 0, 2, ... every iteration."""

    def __init__(self) -> None:
        self.i = 0

    def choose(self, active: int, context: int = 0) -> int:
        self.i += 1
        return (0, 3, 1, 0, 2)[self.i % 5]

    def observe(self, stats) -> None:
        pass


def test_sampling_stays_exact_across_plain_speculative_switches(models):
    from respec.bench.lossless import make_requests, teacher_forced
    from respec.drafter import EagleConfig, EagleDrafter, EagleHead

    target, draft = models
    head = EagleHead(EagleConfig.for_target(target.cfg)).init_weights(torch.Generator().manual_seed(2), std=0.3)
    for drafter in (DraftModelDrafter(draft), EagleDrafter(head, target)):
        eng = Engine(target, drafter=drafter, policy=Alternating(), max_batch=64, seed=5)
        res = eng.generate(make_requests(256, 24, 5), SETTINGS["t1"])
        assert {rd.k for rd in res.rounds} >= {0, 1, 2, 3}
        rows = teacher_forced(target, res.rollouts, SETTINGS["t1"])
        assert min(pooled_pvalues(rows).values()) > ALPHA
