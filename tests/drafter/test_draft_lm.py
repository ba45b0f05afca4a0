"""The standalone draft LM behind the drafter interface, and the engine's non-finite-drafter fallback."""

from __future__ import annotations

import torch

from respec.drafter import DraftModelDrafter
from respec.rollout.engine import Engine, StaticK
from respec.rollout.sampling import SamplingParams

from .conftest import EOS, tiny_target

PROMPTS = [(0, [5, 9, 4]), (1, [7]), (2, [3, 8, 11, 12, 6, 20]), (3, [30, 31])]


def test_target_as_its_own_drafter_is_always_accepted():
    """Draft and target distributions coincide, so at temperature 1 every draft is accepted."""
    model = tiny_target(seed=3)
    eng = Engine(model, eos_token_ids=[EOS], drafter=DraftModelDrafter(model), policy=StaticK(3), max_batch=3, seed=4)
    res = eng.generate(eng.make_requests(PROMPTS, n=2, max_new_tokens=17), SamplingParams(temperature=1.0))
    drafted = sum(r.drafted for r in res.rollouts)
    assert drafted > 50
    assert all(r.accepted == r.drafted for r in res.rollouts)
    assert sum(s.fallback_rows for s in res.rounds) == 0


class _NaNRowModel(torch.nn.Module):
    """A draft model whose logits are NaN for cache slot 0 (whichever row sits there)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def new_cache(self, max_rows, max_len):
        return self.model.new_cache(max_rows, max_len)

    def forward(self, tokens, **kw):
        out = self.model(tokens, **kw)
        out.logits[0] = float("nan")
        return out


def test_non_finite_drafter_row_falls_back_to_plain():
    model = tiny_target(seed=3)
    greedy = SamplingParams(temperature=0.0)
    plain = Engine(model, eos_token_ids=[EOS], max_batch=3, seed=4)
    reqs = plain.make_requests(PROMPTS, n=1, max_new_tokens=15)
    expected = [r.token_ids for r in plain.generate(reqs, greedy).rollouts]
    eng = Engine(model, eos_token_ids=[EOS], drafter=DraftModelDrafter(_NaNRowModel(model)), policy=StaticK(3),
                 max_batch=3, seed=4)
    res = eng.generate(reqs, greedy)
    assert [r.token_ids for r in res.rollouts] == expected
    assert sum(s.fallback_rows for s in res.rounds) > 0  # slot 0 ran plain in every speculative round
    assert sum(r.accepted for r in res.rollouts) > 0  # the other rows still speculated
