"""Exact expected acceptance (alpha from stored target and drafter distributions along the drafter's
own unroll) agrees with the acceptance the engine measures, for a poor and a trained drafter.

The target is a tiny LM with its attention outputs zeroed: its next-token law depends on the
current token only, so a head learns it in a few dozen steps (acceptance far from a random head's)
and the law changes from position to position (an estimate that pairs a draft with the wrong
position's law, or skips the unroll's own-feature steps, misses the measurement by several times
the tolerance).
"""

from __future__ import annotations

import pytest
import torch

from respec.bench.lossless import tiny_lm
from respec.drafter import EagleConfig, EagleDrafter, EagleHead
from respec.drafter.acceptance import expected_acceptance
from respec.drafter.distill import Sample
from respec.drafter.learner import learner_update
from respec.rollout.engine import Engine, StaticK
from respec.rollout.sampling import SamplingParams

from .online_helpers import capture, job, requests

V = 12
K = 3
ROWS = 128  # x 24 tokens: standard error of the measured tau ~0.03


def token_conditional_lm():
    target = tiny_lm(0, std=0.25, vocab=V)
    with torch.no_grad():
        for layer in target.layers:
            layer.attn.wo.weight.zero_()
    return target


def _measured_and_expected(target, head, sampling, seed):
    reqs = requests(ROWS, step=seed, max_new=24, vocab=V)
    engine = Engine(target, drafter=EagleDrafter(head, target), policy=StaticK(K), max_batch=ROWS, seed=seed)
    result = engine.generate(reqs, sampling)
    seqs = [Sample(r.request.prompt_ids + tuple(r.token_ids), len(r.request.prompt_ids)) for r in result.rollouts]
    return result, expected_acceptance(head, target, seqs, sampling, K)


def _measured_accept_at(result):
    """The engine's P(drafts 1..j all accepted | j drafted), pooled over the rounds."""
    spec = [r for r in result.rounds if r.k > 0]
    return [sum(r.accepted_at[j] for r in spec if j < len(r.accepted_at)) /
            sum(r.drafted_at[j] for r in spec if j < len(r.drafted_at)) for j in range(K)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_expected_acceptance_matches_the_engine(temperature):
    sampling = SamplingParams(temperature)
    target = token_conditional_lm()
    head = EagleHead(EagleConfig.for_target(target.cfg)).init_weights(torch.Generator().manual_seed(0)).eval()
    taus = []
    for phase in range(2):
        if phase == 1:  # train the head on captured rollouts, through the online learner
            records, _, _ = capture(target, head, requests(64, step=9, max_new=24, vocab=V), top_k=6, eos=())
            state, _, _ = learner_update(job(target, head, records, steps_per_update=30, temperature=temperature))
            head.load_state_dict(state)
        result, est = _measured_and_expected(target, head, sampling, seed=phase)
        assert est.rounds == result.tokens
        # tokens / expected passes estimates what the engine measures; the per-position mean tau
        # weights every position equally (real rounds start where the previous one ended): looser
        assert est.tau_rounds == pytest.approx(result.mean_accept_len, abs=0.08)
        assert est.tau == pytest.approx(result.mean_accept_len, abs=0.12)
        assert est.accept_at == pytest.approx(_measured_accept_at(result), abs=0.06)
        taus.append(result.mean_accept_len)
    assert taus[1] > taus[0] + 0.8
