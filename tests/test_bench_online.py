"""Smoke tests of `respec bench overlap` and `respec bench stale` on a tiny actor and a tiny EAGLE
head built in code: the payloads' structure and the invariants the reports rest on (the frozen
head never moves, every variant is scored on the same batch and learns from the same replay batch,
overlap efficiency is the issue's formula). Timings here mean nothing; benchmarks/ holds those."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from respec.bench import overlap, stale
from respec.bench.workload import RLWorkload, parse_sets
from respec.cli import main
from respec.rl.trainer import prompt_encoder

from .rl.conftest import SyntheticPrompts, synthetic_reward, tiny_eagle, tiny_lm, train_config

VOCAB = 8


def tiny_workload(k: int = 2, steps: int = 3) -> RLWorkload:
    cfg = train_config(steps=steps, rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8, "spec": str(k)},
                       drafter={"tokens_per_update": 32, "lr": 1e-2})
    actor = tiny_lm(vocab=VOCAB)
    return RLWorkload(cfg=cfg, actor=actor, head=tiny_eagle(actor), prompts=SyntheticPrompts(VOCAB),
                      reward=synthetic_reward(), encode=prompt_encoder(None), decode=lambda ids: " ".join(map(str, ids)),
                      heldout=SyntheticPrompts(VOCAB).batch(100, 3))


# ---- overlap -------------------------------------------------------------------------------------
def _trace(step: int, start: float, step_s: float, learner_s: float | None) -> overlap.StepTrace:
    phases = dict.fromkeys(overlap.PHASES, 0.0)
    phases["generate"] = step_s
    return overlap.StepTrace(step, start, step_s, phases, 2.0, learner_s, None if learner_s is None else start)


def test_overlap_summary_applies_the_formulas():
    times = {"frozen": [1.0, 1.1, 0.9, 1.0, 1.05], "sync": [1.6, 1.5, 1.55, 1.6, 1.5], "async": [1.1, 1.2, 1.1, 1.15, 1.1],
             "async_start": [1.3, 1.4, 1.35, 1.3, 1.45]}
    details = {arm: [overlap.Rep([_trace(0, 0.0, 1.0, None if arm == "frozen" else 0.5),
                                  _trace(1, 1.0, t, None if arm == "frozen" else 0.6)], 0) for t in times[arm]]
               for arm in overlap.ARMS}
    p = overlap.summarize_overlap(times, details, skip=1, work=tiny_workload(), steps_per_rep=2)
    assert p["t_learner_s"] == pytest.approx(statistics.median([0.5, 0.6] * 5))
    expected = (statistics.median(times["sync"]) - statistics.median(times["async"])) / p["t_learner_s"]
    e = p["overlap_efficiency"]
    assert e["median"] == pytest.approx(expected, abs=1e-4) and e["ci95"][0] <= e["median"] <= e["ci95"][1]
    assert p["async_over_frozen"]["median"] == pytest.approx(statistics.median(times["async"]) / 1.0)
    assert p["goal_overlap_efficiency_ge_0_5"] is (expected >= 0.5)
    start = (statistics.median(times["sync"]) - statistics.median(times["async_start"])) / p["t_learner_s"]
    assert p["overlap_efficiency_start"]["median"] == pytest.approx(start, abs=1e-4) and start < 0.5 < expected
    assert p["goal_overlap_efficiency_start_ge_0_5"] is False
    assert p["async_start_over_async"]["median"] == pytest.approx(1.35 / 1.1, abs=1e-4)
    assert p["arms"]["frozen"]["learner_s"] == [] and p["arms"]["frozen"]["learner_s_median"] is None
    json.dumps(p)


def test_overlap_end_to_end_on_a_tiny_workload(tmp_path):
    work = tiny_workload()
    p = overlap.measure_overlap(work, steps_per_rep=2, reps=2, warmup=0, progress=None)
    assert set(p["arms"]) == set(overlap.ARMS) and p["reps"] == 2 and p["valid"]
    assert p["arms"]["frozen"]["learner_s"] == []
    for arm in ("sync", "async", "async_start"):  # updates of steps 0 and 1 of both repetitions, timed by the learner
        assert len(p["arms"][arm]["learner_s"]) == 4 and min(p["arms"][arm]["learner_s"]) > 0
    sync, asyn = p["arms"]["sync"]["step_s_per_rep"], p["arms"]["async"]["step_s_per_rep"]
    assert p["overlap_efficiency"]["median"] == pytest.approx(
        (statistics.median(sync) - statistics.median(asyn)) / p["t_learner_s"], abs=1e-4)
    for arm in overlap.ARMS:
        tl = p["timeline"][arm]
        assert [t["step"] for t in tl] == [0, 1]
        for t in tl:
            assert sum(t["phases"].values()) == pytest.approx(t["step_s"], abs=1e-4)  # sync_s is timed inside t3..t4
        assert (tl[0]["learner_s"] is None) == (arm == "frozen")
    a0 = p["timeline"]["async"][0]  # the process learner starts at the launch, after the drafter phase
    ph = a0["phases"]
    assert a0["learner_start_s"] == pytest.approx(a0["start_s"] + ph["drafter_wait"] + ph["generate"] + ph["reward"]
                                                  + ph["drafter"])
    s0, s1 = p["timeline"]["async_start"]  # update 0 starts after step 1's swap; update 1 (in finish) after step 1
    assert s0["learner_start_s"] == pytest.approx(s1["start_s"] + s1["phases"]["drafter_wait"])
    assert s1["learner_start_s"] == pytest.approx(s1["start_s"] + s1["step_s"])
    assert "overlap efficiency" in overlap.render_table(p) and "async_start" in overlap.render_table(p)
    assert overlap.plot_timeline(p, tmp_path / "overlap-timeline.png").stat().st_size > 0
    json.dumps(p)


# ---- stale ---------------------------------------------------------------------------------------
def test_stale_variants_are_paired_and_the_frozen_head_never_moves(tmp_path):
    work = tiny_workload(steps=3)
    initial = {k: v.clone() for k, v in work.head.state_dict().items()}
    run = stale.run_stale(work, steps=3, eval_every=2, eval_samples=2, progress=None)
    p = run.payload
    assert [e["step"] for e in p["evals"]] == [0, 2, 3]
    assert p["variants"] == list(stale.VARIANTS)
    frozen = run.variants["frozen"]
    assert frozen.version == -1 and all(torch.equal(frozen.state[k], initial[k]) for k in initial)
    for name in stale.VARIANTS[1:]:
        v = run.variants[name]
        assert v.version == 2 and any(not torch.equal(v.state[k], initial[k]) for k in initial)
    # the weightings differ (the synthetic reward varies within groups), so the heads do too
    assert any(not torch.equal(run.variants["none"].state[k], run.variants["normalized"].state[k]) for k in initial)
    for e in p["evals"]:  # one batch per evaluation: every variant scored on the same round starts
        assert len({r["rounds"] for r in e["variants"].values()}) == 1 and e["batch"]["tokens"] > 0
        assert all(len(r["alpha"]) == 2 and r["tau_rounds"] >= 1 for r in e["variants"].values())
    first = {r["tau_rounds"] for r in p["evals"][0]["variants"].values()}
    assert len(first) == 1  # before any update every variant is the initial head
    for row in p["train"]:  # every online variant learned from the same replay batch
        assert len(set(row["learner_tokens"].values())) == 1 and None not in row["learner_tokens"].values()
    assert [v["when"] for v in p["validation"]] == ["start"] + ["end"] * len(stale.VARIANTS)
    assert all(v["measured_accept_len"] >= 1 and v["tokens"] > 0 for v in p["validation"])
    assert p["frozen_drop_pct"] == pytest.approx(100 * (p["frozen_tau_first"] - p["frozen_tau_last"]) / p["frozen_tau_first"])
    assert set(p["gap_end"]) == set(stale.VARIANTS[1:]) and p["online_ge_frozen_after_20"]["none"] is None  # no eval > 20
    json.dumps(p)
    assert "tau_rounds per evaluation" in stale.render_table(p)
    assert stale.plot_stale(p, tmp_path / "stale.png").stat().st_size > 0


def test_stale_shift_switches_training_and_evaluation_prompts():
    work = tiny_workload(steps=2)
    shifted = SyntheticPrompts(VOCAB, length=5)
    phases = [stale.Phase(0, work.prompts, tuple(work.heldout), "base"),
              stale.Phase(1, shifted, tuple(shifted.batch(200, 2)), "shifted")]
    run = stale.run_stale(work, steps=2, eval_every=1, eval_samples=1, drive="plain", phases=phases,
                          variants=("frozen", "none"), progress=None)
    p = run.payload
    assert [e["prompts"] for e in p["evals"]] == ["base", "shifted", "shifted"]
    assert [r["prompts"] for r in p["train"]] == ["base", "shifted"]
    assert all(r["accept_len_drive"] == 1.0 for r in p["train"])  # plain decoding drives the trajectory
    assert p["evals"][0]["batch"]["rows"] == 3 and p["evals"][1]["batch"]["rows"] == 2


def test_stale_rejects_an_unknown_driver():
    with pytest.raises(ValueError, match="drive"):
        stale.run_stale(tiny_workload(), steps=1, drive="bogus", progress=None)


def test_shifted_phase_changes_the_task_distribution():
    from types import SimpleNamespace

    from respec.tasks.arithmetic import ArithmeticTask

    work = SimpleNamespace(task=ArithmeticTask(seed=0, heldout_size=100))
    phase = stale.shifted_phase(work, 50, "mul", "", ["mul_multiplier_digits=2,2"], 4)
    assert phase.start == 50 and len(phase.eval_records) == 4 and "mul_multiplier_digits=(2, 2)" in phase.label
    records = list(phase.eval_records) + phase.prompts.batch(50, 8)
    assert {r.columns["family"] for r in records} == {"mul"}
    assert all(r.prompt.split("*")[1].startswith(("1", "2", "3", "4", "5", "6", "7", "8", "9"))
               and len(r.prompt.split("*")[1].rstrip("=\n")) == 2 for r in records)


# ---- command line --------------------------------------------------------------------------------
def test_commands_write_results(tmp_path, monkeypatch):
    """The CLI paths end to end, with the built-in workload swapped for the tiny one."""
    monkeypatch.setattr("respec.bench.workload.builtin_workload", lambda k, sets=(), heldout=0: tiny_workload(k))
    assert main(["bench", "stale", "--steps", "2", "--eval-every", "1", "--eval-samples", "1", "--spec-k", "2",
                 "--out", str(tmp_path / "stale")]) == 0
    assert main(["bench", "overlap", "--steps-per-rep", "2", "--reps", "1", "--warmup", "0", "--spec-k", "2",
                 "--out", str(tmp_path / "overlap")]) == 0
    for name in ("stale.json", "stale.md", "stale.png", "overlap.json", "overlap.md", "overlap-timeline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "stale.json").read_text())["steps"] == 2


@pytest.mark.parametrize("bench", ["overlap", "stale"])
def test_benches_are_registered(bench, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, "--help"])
    assert e.value.code == 0 and "--spec-k" in capsys.readouterr().out


def test_parse_sets_nests_dotted_keys():
    assert parse_sets(["drafter.lr=0.01", "seed=3"]) == {"drafter": {"lr": "0.01"}, "seed": "3"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_sets(["drafter.lr"])
