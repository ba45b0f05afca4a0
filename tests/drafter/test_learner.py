"""The drafter learner: an update lowers the loss and touches only the head's own tensors; the
process learner returns version N for submit N, equal bit for bit to the inline learner (fp32, one
thread); failures (process killed, non-finite weights, timeouts) are reported, the last good head is
kept and the learner restarts; and a learner process never outlives its parent, kill -9 included."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from respec.drafter import EagleHead
from respec.drafter.distill import distill_loss
from respec.drafter.learner import LEARNER_NICE, InlineLearner, ProcessLearner, learner_update
from respec.drafter.online import OnlineDistillConfig, OnlineDistiller

from .conftest import tiny_head, tiny_target
from .online_helpers import capture, distiller_step, job, requests

START_S = 120  # generous: a spawned learner imports torch on a shared, loaded machine


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    head = tiny_head(target, std=0.05)
    records, _, _ = capture(target, head, requests(8, max_new=16))
    return target, head, records


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _equal_optim(a: dict, b: dict) -> bool:
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        _equal_states(a["state"][p], b["state"][p]) for p in a["state"])


def _batch_loss(head_cfg, state, target, j) -> float:
    head = EagleHead(head_cfg)
    head.load_state_dict(state)
    b, s = j.batch, j.settings
    with torch.no_grad():
        loss, _ = distill_loss(head, target, b.tokens, b.features.float(), b.target, b.loss_mask, s.depth,
                               sample_weight=b.weights, step_decay=s.step_decay)
    return float(loss)


def test_update_lowers_the_kl_and_touches_only_the_head(setup):
    target, head, records = setup
    actor_before = {k: v.clone() for k, v in target.state_dict().items()}
    j = job(target, head, records)
    inputs = {k: v.clone() for k, v in j.head_state.items()}
    state, optim, stats = learner_update(j)
    assert set(state) == set(head.state_dict()) and not any("embed" in k or "lm_head" in k for k in state)
    before, after = _batch_loss(head.cfg, inputs, target, j), _batch_loss(head.cfg, state, target, j)
    assert stats["loss_first"] == pytest.approx(before, rel=1e-5)
    assert after < 0.9 * before  # forward KL (up to the target's entropy) on the fixed batch
    assert _equal_states(j.head_state, inputs)  # a pure function of the job
    assert _equal_states(target.state_dict(), actor_before)
    assert all(p.grad is None for p in target.parameters())
    # a second update continues from the returned optimizer state without writing into it
    optim_before = {p: {k: v.clone() for k, v in e.items()} for p, e in optim["state"].items()}
    state2, _, stats2 = learner_update(job(target, head, records, head_state=state, optim_state=optim))
    assert all(_equal_states(optim["state"][p], optim_before[p]) for p in optim_before)
    assert stats2["loss_first"] == pytest.approx(after, rel=1e-5) and stats2["loss_last"] < after


def test_process_learner_equals_inline_bit_for_bit(setup):
    target, head, records = setup
    inline, proc = InlineLearner(), ProcessLearner()
    try:
        j0 = job(target, head, records)
        inline.submit(0, j0)
        proc.submit(0, j0)
        r_in, r_pr = inline.result(0), proc.result(0, timeout=START_S)
        assert r_pr.ok, r_pr.error
        assert r_pr.version == 0 and _equal_states(r_in.head_state, r_pr.head_state)
        assert _equal_optim(r_in.optim_state, r_pr.optim_state)
        j1 = job(target, head, records[:5], head_state=r_pr.head_state, optim_state=r_pr.optim_state,
                 steps_per_update=2)
        inline.submit(1, j1)
        proc.submit(1, j1)
        r_in, r_pr = inline.result(1), proc.result(1, timeout=START_S)
        assert r_pr.ok and r_pr.version == 1 and _equal_states(r_in.head_state, r_pr.head_state)
        assert not _equal_states(r_pr.head_state, j1.head_state)
        assert proc.latest() is None and proc.restarts == 0
        assert not proc.result(7, timeout=1).ok  # never submitted
    finally:
        proc.close()
    assert proc._proc is None


def test_async_distiller_swaps_the_same_heads_as_sync(setup):
    """Reproducible mode: at every boundary N both swap in update N-1, so both drive identical
    rollouts, buffers and heads (the learner process changes where the update runs, nothing else)."""
    target = setup[0]
    cfg = dict(fraction=0.5, tokens_per_update=64, lr=1e-2)
    sync = OnlineDistiller(OnlineDistillConfig(mode="sync", **cfg), tiny_head(target))
    proc = OnlineDistiller(OnlineDistillConfig(mode="async", **cfg), tiny_head(target))
    try:
        for step in range(3):
            assert distiller_step(sync, target, step) and distiller_step(proc, target, step)
            assert sync.version == proc.version == step - 1
            assert _equal_states(sync.head.state_dict(), proc.head.state_dict())
            assert sync.buffer.nbytes == proc.buffer.nbytes
        assert sync.swap() and proc.swap() and proc.version == 2
        assert _equal_states(sync.head.state_dict(), proc.head.state_dict())
        assert proc.failures == 0 and proc.metrics(3)["drafter_lag"] == 1
    finally:
        proc.close()


def test_killed_learner_is_reported_and_restarted(setup):
    target, head, records = setup
    proc = ProcessLearner()
    try:
        assert proc.wait_ready(START_S)
        first = proc.pid
        expected_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + LEARNER_NICE)
        assert os.getpriority(os.PRIO_PROCESS, first) == expected_nice  # background priority
        proc.submit(0, job(target, head, records, steps_per_update=100_000))  # busy for minutes
        res = proc.result(0, timeout=0.2)
        assert not res.ok and "timed out" in res.error
        os.kill(first, signal.SIGKILL)
        res = proc.result(0, timeout=30)
        assert not res.ok and "died" in res.error and res.head_state is None
        proc.submit(1, job(target, head, records))
        res = proc.result(1, timeout=START_S)
        assert res.ok and res.version == 1 and proc.restarts == 1 and proc.pid != first
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == expected_nice  # the restarted one too
    finally:
        proc.close()


def test_distiller_keeps_the_last_good_head_on_nonfinite_weights(setup):
    target, head0, records = setup
    head = tiny_head(target, std=0.05)
    cfg = OnlineDistillConfig(mode="async", tokens_per_update=10_000, lr=1e-2)
    d = OnlineDistiller(cfg, head)
    try:
        good = {k: v.clone() for k, v in head.state_dict().items()}
        bad = [r.window(0, r.length) for r in records]
        bad[0].features = torch.full_like(bad[0].features, math.nan)
        d.buffer.add(bad)
        assert d.launch(0, target)
        assert not d.swap() and d.failures == 1 and "non-finite" in d.last_error
        assert _equal_states(head.state_dict(), good) and d.version == -1
        d.buffer = type(d.buffer)(d.buffer.max_bytes)
        d.buffer.add(records)
        assert d.launch(1, target) and d.swap()
        assert d.version == 1 and not _equal_states(head.state_dict(), good)
        assert d.metrics(2)["drafter_failures"] == 1 and d.learner.restarts == 0
    finally:
        d.close()


ORPHAN_SCRIPT = """
import sys, time, torch
from respec.drafter.learner import ProcessLearner
learner = ProcessLearner()
assert learner.wait_ready(120)
learner.submit(0, torch.load(sys.argv[1], weights_only=False))  # keeps the child busy computing
time.sleep(1.0)
print(learner.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child whose new parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_learner_never_outlives_a_killed_parent(setup, tmp_path):
    target, head, records = setup
    path = tmp_path / "job.pt"
    torch.save(job(target, head, records, steps_per_update=100_000), path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent did not start its learner (exit {parent.poll()})"
        child = int(line)
        assert _running(child)  # busy in an update, not waiting on its pipe
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the learner process outlived its SIGKILLed parent"
