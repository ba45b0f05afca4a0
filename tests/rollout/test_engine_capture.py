"""The capture API: per committed position, the target features the drafter consumes and the
target distribution, identical in plain and speculative mode (and equal to teacher forcing)."""

from __future__ import annotations

import torch

from respec.bench.lossless import perturbed, tiny_lm
from respec.drafter import DraftModelDrafter, EagleConfig, EagleDrafter, EagleHead
from respec.rollout.engine import Engine, Request, StaticK
from respec.rollout.sampling import SamplingParams, transform


def collect(engine: Engine, reqs, sampling):
    commits = []
    engine.capture = commits.append
    res = engine.generate(reqs, sampling)
    per_row: dict[int, dict[int, tuple]] = {}
    for c in commits:
        for i in range(len(c.positions)):
            per_row.setdefault(int(c.rollout_index[i]), {})[int(c.positions[i])] = (
                c.features[i], c.target_probs[i], int(c.next_tokens[i]))
    return res, per_row


def test_capture_matches_teacher_forcing_in_plain_and_speculative_mode():
    target = tiny_lm(0)
    head = EagleHead(EagleConfig.for_target(target.cfg)).init_weights(torch.Generator().manual_seed(0), std=0.1)
    layers = head.cfg.feature_layers
    reqs = [Request(f"r{i}", tuple(range(1, 2 + i)), 0, 12) for i in range(5)]
    sampling = SamplingParams(1.0)
    plain = Engine(target, feature_layers=layers, max_batch=5)
    spec = Engine(target, drafter=EagleDrafter(head, target), policy=StaticK(3), max_batch=3)
    for engine in (plain, spec):
        res, per_row = collect(engine, reqs, sampling)
        for ri, r in enumerate(res.rollouts):
            seq = torch.tensor(list(r.request.prompt_ids) + r.token_ids)
            with torch.no_grad():
                out = target(seq[None], hidden_layers=layers)
            P = len(r.request.prompt_ids)
            got = per_row[ri]
            assert sorted(got) == list(range(P - 1, P - 1 + len(r.token_ids)))  # every committed position once
            for pos, (feat, probs, nxt) in got.items():
                assert nxt == seq[pos + 1]
                assert torch.allclose(feat, out.hidden[0, pos], rtol=1e-5, atol=1e-4)
                assert torch.allclose(probs, transform(out.logits[0, pos], sampling).probs, atol=1e-5)
    assert any(rd.k == 3 for rd in res.rounds)

