"""The capture API: per committed position, the target features the drafter consumes and the
target distribution, and at admission the prompt's features, identical in plain and speculative
mode (and equal to teacher forcing)."""

from __future__ import annotations

import torch

from respec.bench.lossless import perturbed, tiny_lm
from respec.drafter import DraftModelDrafter, EagleConfig, EagleDrafter, EagleHead
from respec.rollout.engine import Commit, Engine, Prefill, Request, StaticK
from respec.rollout.sampling import SamplingParams, transform


def collect(engine: Engine, reqs, sampling):
    events = []
    engine.capture = events.append
    res = engine.generate(reqs, sampling)
    per_row: dict[int, dict[int, tuple]] = {}
    for p in (e for e in events if isinstance(e, Prefill)):  # prompt positions: features only
        for i in range(len(p.rollout_index)):
            row = per_row.setdefault(int(p.rollout_index[i]), {})
            for pos in range(int(p.lengths[i])):
                assert pos not in row
                row[pos] = (p.features[i, pos].clone(), None, None)
    for c in (e for e in events if isinstance(e, Commit)):
        for i in range(len(c.positions)):
            per_row.setdefault(int(c.rollout_index[i]), {})[int(c.positions[i])] = (
                c.features[i], c.target_probs[i], int(c.next_tokens[i]))
    return res, per_row


def test_capture_matches_teacher_forcing_in_plain_and_speculative_mode():
    target = tiny_lm(0)
    head = EagleHead(EagleConfig.for_target(target.cfg)).init_weights(torch.Generator().manual_seed(0), std=0.1)
    layers = head.cfg.feature_layers
    reqs = [Request(f"r{i}", tuple(range(1, 2 + i)), 0, 12) for i in range(5)]
    reqs += [Request("r4", reqs[4].prompt_ids, 1, 12)]  # a second sample: its prefill is a copy
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
            assert sorted(got) == list(range(P - 1 + len(r.token_ids)))  # every prompt and committed position once
            for pos, (feat, probs, nxt) in got.items():
                assert torch.allclose(feat, out.hidden[0, pos], rtol=1e-5, atol=1e-4)
                if pos < P - 1:
                    assert probs is None  # a prompt position: its next token is not the engine's
                    continue
                assert nxt == seq[pos + 1]
                assert torch.allclose(probs, transform(out.logits[0, pos], sampling).probs, atol=1e-5)
    assert any(rd.k == 3 for rd in res.rounds)

