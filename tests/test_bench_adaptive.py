"""Smoke test of `respec bench adaptive` on a tiny actor (task tokenizer) and a random EAGLE head:
both parts run, the payload renders, and the fixed-batch figure is the steady-state one."""

from __future__ import annotations

import argparse

from respec.bench import adaptive
from respec.drafter import EagleDrafter
from respec.tasks import ArithmeticTask
from respec.tasks.pretrain import task_tokenizer
from respec.tuner import AcceptanceModel, AdaptiveK, CostProfile

from .rl.conftest import tiny_eagle, tiny_lm


def test_both_parts_run_and_render():
    tok = task_tokenizer()
    model = tiny_lm(vocab=tok.vocab_size, width=32)
    drafter = EagleDrafter(tiny_eagle(model), model)
    grid = [1, 2, 4]
    prof = CostProfile(grid, {B: {q: 0.001 * q for q in range(1, 5)} for B in grid}, {B: 1e-4 for B in grid})

    def policy() -> AdaptiveK:
        return AdaptiveK(prof, acceptance=AcceptanceModel(max_k=3), max_k=3)

    args = argparse.Namespace(new_tokens=4, reps=2, rollout_prompts=2, rollout_group=2, rollout_max_new=6,
                              rollout_batches=2)
    task = ArithmeticTask(seed=1)
    fixed = adaptive.fixed_batches(model, tok, drafter, task, [1, 2], [1, 2], policy, args)
    assert [r["batch_size"] for r in fixed] == [1, 2]
    for r in fixed:
        assert set(r["tokens_per_s"]) == {"plain", "k1", "k2", "adaptive"} and all(v > 0 for v in r["tokens_per_s"].values())
        assert r["best_static"] in ("k1", "k2") and sum(r["adaptive_choice_shares"].values()) > 0.99
    rollouts = adaptive.whole_rollouts(model, tok, drafter, task, [1, 2], policy, args)
    assert rollouts["rows"] == 4 and rollouts["rollouts_per_rep"] == 2 and rollouts["timeline"]
    assert set(rollouts["speedup_over_plain"]) == {"k1", "k2", "adaptive"}
    # per active-batch range: 4 rows start in the 3-5 range and drain through 1-2
    assert set(rollouts["range_adaptive_over"]) == {"plain", "k1", "k2"}
    assert set(rollouts["range_tokens_per_s"]["plain"]) <= {"1-2", "3-5"} and "3-5" in rollouts["range_tokens_per_s"]["plain"]
    assert all(v > 0 for d in rollouts["range_tokens_per_s"].values() for v in d.values())
    md = adaptive.render_table({"info": {"device_name": "cpu", "torch": "x", "threads": 1, "command": "test"},
                                "new_tokens": 4, "fixed_batch": fixed, "whole_rollouts": rollouts})
    assert "| 2 |" in md and "adaptive faster than every static k" in md and "3-5 rows" in md
