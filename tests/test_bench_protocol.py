"""Benchmark statistics: the bootstrap ratio, the Student-t tail and the GRPO on/off study summary."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from respec.bench.grpo import render_table, summarize
from respec.bench.protocol import ratio_ci, student_t_sf


@pytest.mark.parametrize("t, dof, expected", [
    (2.0, 4, 0.0580583), (1.0, 10, 0.1704466), (3.0, 2, 0.0477329), (12.7062, 1, 0.025), (2.7764, 4, 0.025),
    (0.0, 7, 0.5), (-1.0, 10, 1 - 0.1704466),
])
def test_student_t_tail_matches_tables(t, dof, expected):
    assert student_t_sf(t, dof) == pytest.approx(expected, abs=2e-6)


def test_ratio_interval_contains_the_point_and_separates_real_differences():
    rng = random.Random(0)
    a = [1.0 + 0.02 * rng.random() for _ in range(7)]
    b = [2.0 + 0.02 * rng.random() for _ in range(7)]
    r = ratio_ci(b, a)
    assert r.lo <= r.median <= r.hi and 1.9 < r.lo and r.hi < 2.1


def fake_run(root, name, seed, shift):
    rng = random.Random(seed)
    d = root / name
    d.mkdir()
    rows = []
    for step in range(40):
        rows.append({"kind": "train", "step": step, "reward_mean": 0.2 + 0.005 * step + shift + 0.03 * rng.gauss(0, 1),
                     "time_generate_s": (1.0 if "off" in name else 0.6) * (1 + 0.05 * rng.random()),
                     "time_step_s": 2.0, "spec_accept_len": 1.0 if "off" in name else 2.5})
    for step in (0, 20, 40):
        rows.append({"kind": "eval", "step": step, "eval_pass_rate_sampled": 0.3 + 0.002 * step + shift + 0.02 * rng.gauss(0, 1),
                     "eval_pass_rate_t0": 0.4 + shift + 0.02 * rng.gauss(0, 1)})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.mark.parametrize("shift, within", [(0.0, True), (0.3, False)])
def test_grpo_study_summary_flags_arms_that_learn_differently(tmp_path, shift, within):
    runs = {"off": [fake_run(tmp_path, f"off-{s}", s, 0.0) for s in range(3)],
            "adaptive": [fake_run(tmp_path, f"adaptive-{s}", 10 + s, shift) for s in range(3)]}
    args = SimpleNamespace(seeds="0,1,2", steps=40, set=[])
    payload = summarize(runs, ["off", "adaptive"], args)
    assert payload["within_noise"] is within
    assert payload["eval_steps"] == [0, 20, 40]
    g = payload["generate_speedup_per_step"]
    assert g["ci95"][0] <= g["median"] <= g["ci95"][1] and 1.5 < g["median"] < 1.8  # 1.0 / 0.6 per step
    assert "within seed-to-seed noise" in render_table(payload)


def test_rollout_bench_refuses_a_draft_model_dir_without_a_checkpoint_before_measuring(tmp_path):
    from respec.bench.rollout import _draft_model_dir

    assert _draft_model_dir("") == ""  # no assisted baseline
    with pytest.raises(SystemExit, match="no config.json"):
        _draft_model_dir(str(tmp_path))
