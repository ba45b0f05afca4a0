"""The adaptive controller driving the real engine: where the profile says speculation cannot pay,
every decode iteration runs plain; where it pays, the engine speculates; and a checkpointed
controller decides exactly as before (its cost profile travels with it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


from respec.bench.lossless import make_requests, perturbed, tiny_lm
from respec.drafter import DraftModelDrafter
from respec.rl.checkpoint import load_policy_state, policy_state
from respec.rollout.engine import Engine
from respec.rollout.sampling import SamplingParams
from respec.tuner import AcceptanceModel, AdaptiveK, CostProfile

GRID = [1, 2, 4, 8, 16, 32, 64]


def profile(verify_per_extra_token: float) -> CostProfile:
    """Verify cost = 4 ms + per-(row x extra query token) cost; drafter step 0.5 ms."""
    verify = {B: {q: 0.004 + verify_per_extra_token * B * (q - 1) for q in range(1, 10)} for B in GRID}
    return CostProfile(GRID, verify, {B: 0.0005 for B in GRID})


def run(policy: AdaptiveK, rows: int):
    target = tiny_lm(0)
    eng = Engine(target, drafter=DraftModelDrafter(perturbed(target, 0.08, 1)), policy=policy, max_batch=rows, seed=3)
    return eng.generate(make_requests(rows, 16, 7), SamplingParams(1.0))


def test_controller_chooses_plain_at_every_iteration_where_verify_is_too_expensive():
    # CPU fp32 at batch 64: verifying k+1 tokens costs ~(1 + 0.6 k)x one token, more than tau can repay
    policy = AdaptiveK(profile(0.0015), acceptance=AcceptanceModel(prior=0.9))
    res = run(policy, rows=64)
    assert res.rounds and all(rd.k == 0 and rd.drafted == 0 for rd in res.rounds)
    assert {k for _, k in policy.decisions} == {0}


def test_controller_speculates_where_verify_is_cheap():
    policy = AdaptiveK(profile(0.00002), acceptance=AcceptanceModel(prior=0.9))
    res = run(policy, rows=4)
    assert sum(rd.k > 0 for rd in res.rounds) > 0.9 * len(res.rounds)
    assert sum(rd.accepted for rd in res.rounds) > 0


def test_checkpointed_controller_restores_its_profile_and_decides_the_same():
    a = AdaptiveK(profile(0.00005))
    for B in (64, 32, 8, 2, 1):
        a.choose(B)
    for i in range(80):  # per-cell acceptance evidence: a poor one-row tail, a good 8-row batch
        a.observe(SimpleNamespace(k=3, active=1, accepted_at=[int(i % 3 == 0), 0, 0], drafted_at=[1, 1, 1]))
    a.observe(SimpleNamespace(k=3, active=8, accepted_at=[8, 7, 6], drafted_at=[8, 8, 8]))
    state = json.loads(json.dumps(policy_state(a)))  # what a checkpoint's JSON holds
    b = AdaptiveK(profile(0.01))  # a resumed run whose fresh profile would decide differently
    assert b.best(8) != a.best(8)
    load_policy_state(b, state)
    assert b.profile.to_dict() == a.profile.to_dict()
    assert {c: m.state() for c, m in b.by_cell.items()} == {c: m.state() for c, m in a.by_cell.items()} != {}
    assert b.acceptance_at(1).alpha(0) == a.acceptance_at(1).alpha(0) < 0.5
    assert [b.choose(B) for B in (8, 4, 2, 1, 1)] == [a.choose(B) for B in (8, 4, 2, 1, 1)]


def test_every_round_reports_its_wall_time_covering_draft_and_verify():
    from respec.bench.adaptive import steady_tokens_per_s

    res = run(AdaptiveK(profile(0.0), acceptance=AcceptanceModel(prior=0.9)), rows=8)
    assert res.rounds and all(r.round_s >= r.draft_s + r.verify_s > 0 for r in res.rounds)
    assert sum(r.round_s for r in res.rounds) <= res.wall_s
    # the steady-state figure counts only iterations with all B rows: a draining tail is left out
    fake = SimpleNamespace(rounds=[SimpleNamespace(active=8, emitted=16, round_s=0.01),
                                   SimpleNamespace(active=3, emitted=3, round_s=0.01),
                                   SimpleNamespace(active=8, emitted=24, round_s=0.03)])
    assert steady_tokens_per_s(fake, 8) == pytest.approx(40 / 0.04)


def test_the_engine_tells_the_policy_the_longest_active_rows_context():
    """choose(active, context): context = the longest active row's prompt + generated tokens, the KV
    length the next forward reads (the cost profile prices forwards by it)."""
    seen: list[tuple[int, int]] = []

    class Recording:
        def choose(self, active: int, context: int) -> int:
            seen.append((active, context))
            return 2

        def observe(self, stats) -> None:
            pass

    target = tiny_lm(0)
    eng = Engine(target, drafter=DraftModelDrafter(perturbed(target, 0.08, 1)), policy=Recording(), max_batch=4, seed=3)
    reqs = make_requests(4, 16, 7)
    res = eng.generate(reqs, SamplingParams(1.0))
    # each row's tokens emitted per round, from round_slots (0, 1, .. m-1 per round); all 4 rows are
    # admitted at iteration 0, so a row's round t is the engine's iteration t
    per_round = []
    for ro in res.rollouts:
        runs: list[int] = []
        for s in ro.round_slots:
            if s == 0:
                runs.append(0)
            runs[-1] += 1
        per_round.append(runs)
    expected = []
    for t in range(len(res.rounds)):
        live = [len(r.prompt_ids) + sum(runs[:t]) for r, runs in zip(reqs, per_round) if len(runs) > t]
        expected.append((len(live), max(live)))
    assert seen == expected
    assert len({ctx for _, ctx in seen}) > 10  # it moves as rows grow (and as the longest finish)
