"""GRPOTrainer behaviour on tiny models: it learns, it updates, and its log-probs are the engine's."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from respec.rl import trainer as trainer_mod
from respec.rl.batch import build_batch, response_logits, token_logprobs
from respec.rl.trainer import TrainError
from respec.rollout.engine import Request
from respec.rollout.sampling import SamplingParams, logprobs_of

from .conftest import tiny_lm, train_config


def test_tiny_model_learns_the_synthetic_reward(make_trainer):
    """vocab 8, reward = fraction of TARGET tokens: ~1/8 at random init, > 0.8 within 30 steps."""
    cfg = train_config(steps=30, rl={"epochs": 2}, optim={"minibatch_size": 32})
    t = make_trainer(cfg)
    t0 = time.perf_counter()
    rewards = [t.train_step(step)["reward_mean"] for step in range(cfg.steps)]
    assert rewards[0] < 0.2, rewards
    assert sum(rewards[-3:]) / 3 > 0.8, rewards
    assert time.perf_counter() - t0 < 30


def test_parameters_change_after_one_step(make_trainer):
    t = make_trainer(train_config(rollout={"prompts_per_step": 4, "group_size": 4}))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    m = t.train_step(0)
    assert m["zero_std_fraction"] < 1 and m["grad_norm"] > 0 and m["updates"] == 1
    unchanged = [n for n, p in t.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


SAMPLING = {"temperature": 0.8, "top_p": 0.9}  # a real nucleus, so recorded sizes matter


def ratio_error(trainer) -> float:
    """max |exp(train log-prob - engine log-prob) - 1| over a fresh generation by the trainer's engine."""
    reqs = [Request(f"check/{i}", (1 + i % 5, 2, 3), s, 10) for i in range(6) for s in range(3)]
    gen = trainer.engine.generate(reqs, trainer.sampling)
    batch = build_batch(gen.rollouts, torch.zeros(len(reqs)), "cpu")
    with torch.no_grad():
        logits = response_logits(trainer.model, batch, "check")
        lp, _ = token_logprobs(logits, batch.response_ids, batch.nucleus_sizes, trainer.sampling)
    return ((lp - batch.engine_logprobs).exp() - 1)[batch.mask].abs().max().item()


def test_train_and_engine_logprobs_agree_before_and_after_an_update(make_trainer):
    cfg = train_config(rollout={"prompts_per_step": 4, "group_size": 4, **SAMPLING}, optim={"lr": 1e-3})
    t = make_trainer(cfg, tiny_lm(std=0.3))
    assert t.engine.model is t.model  # the engine samples from the live actor
    assert ratio_error(t) < 1e-5
    t.train_step(0)
    assert ratio_error(t) < 1e-5
    m = t.train_step(1)
    assert m["entropy"] > 0.5  # still a spread-out policy: the check is not trivially 0 == 0
    assert m["logprob_gap_max"] < 1e-5 and m["ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_a_stale_engine_copy_is_caught_and_syncing_fixes_it(make_trainer, monkeypatch):
    cfg = train_config(rollout={"prompts_per_step": 4, "group_size": 4, **SAMPLING}, optim={"lr": 1e-3})
    model = tiny_lm(std=0.3)
    synced = make_trainer(cfg, model, engine_model=copy.deepcopy(model))
    synced.train_step(0)  # sync_weights copies into the engine's own model
    assert ratio_error(synced) < 1e-5

    model = tiny_lm(std=0.3)
    stale = make_trainer(cfg, model, engine_model=copy.deepcopy(model))
    monkeypatch.setattr(stale, "sync_weights", lambda: 0.0)  # the bug: a copy nobody updates
    stale.train_step(0)
    assert ratio_error(stale) > 1e-3


def test_nucleus_guard_keeps_a_token_that_fell_out_of_the_recorded_nucleus():
    sp = SamplingParams(temperature=1.0, top_p=0.5)
    # the engine saw token 1 ranked 2nd (nucleus 2); the trainer's logits rank it 3rd by a hair
    logits = torch.tensor([[2.0, 1.0, 1.0 + 1e-6, -1.0]])
    tokens, nucleus = torch.tensor([1]), torch.tensor([2])
    assert logprobs_of(logits, tokens, sp, nucleus_size=nucleus).item() == -math.inf  # what the guard prevents
    lp, guarded = token_logprobs(logits, tokens, nucleus, sp)
    assert guarded.tolist() == [True]
    assert lp.item() == pytest.approx(logprobs_of(logits, tokens, sp, nucleus_size=torch.tensor([3])).item())
    # inside the nucleus nothing changes
    lp2, g2 = token_logprobs(logits, torch.tensor([0]), nucleus, sp)
    assert g2.tolist() == [False]
    assert lp2.item() == logprobs_of(logits, torch.tensor([0]), sp, nucleus_size=nucleus).item()


def test_recompute_and_kl_modes_run(make_trainer):
    cfg = train_config(rollout={"prompts_per_step": 2, "group_size": 4, **SAMPLING},
                       rl={"old_logprobs": "recompute", "kl_beta": 0.1, "aggregation": "sequence", "epochs": 2},
                       optim={"minibatch_size": 4, "micro_batch_size": 3})
    t = make_trainer(cfg, tiny_lm(std=0.3))
    assert t.ref_model is not None
    m0 = t.train_step(0)
    assert m0["updates"] == 4 and m0["kl_ref"] is not None and m0["kl_ref"] >= 0
    assert m0["logprob_gap_max"] < 1e-5
    m1 = t.train_step(1)
    assert m1["kl_ref"] > 0  # the policy has moved away from the frozen reference
    assert make_trainer(train_config()).ref_model is None  # beta = 0: no reference model is built


def test_non_finite_logits_and_loss_stop_naming_the_step(make_trainer, monkeypatch):
    model = tiny_lm()
    with torch.no_grad():
        model.layers[0].mlp.w_down.weight[0, 0] = float("nan")
    with pytest.raises(TrainError, match="step 0: rollout generation"):
        make_trainer(train_config(), model).train_step(0)

    real = trainer_mod.policy_loss
    monkeypatch.setattr(trainer_mod, "policy_loss", lambda *a, **k: (lambda out: (out[0] * math.nan, out[1]))(real(*a, **k)))
    with pytest.raises(TrainError, match="step 4: non-finite loss"):
        make_trainer(train_config(rollout={"prompts_per_step": 2, "group_size": 2})).train_step(4)


def test_lr_schedule_warms_up_then_follows_the_cosine_to_its_floor():
    cfg = train_config(steps=21, optim={"lr": 1.0, "warmup_steps": 4, "schedule": "cosine", "min_lr_ratio": 0.1})
    lrs = [trainer_mod.lr_at(s, cfg) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0][:4] and lrs[4] == 1.0
    assert lrs[-1] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    const = train_config(optim={"lr": 0.5, "warmup_steps": 0, "schedule": "constant"})
    assert {trainer_mod.lr_at(s, const) for s in range(10)} == {0.5}


def test_dataset_prompts_are_a_pure_function_of_seed_and_step():
    from respec.tasks.data import PromptDataset, PromptRecord

    ds = PromptDataset(tuple(PromptRecord(f"r{i}", "x", None, {}) for i in range(7)), "mem")
    a, b = trainer_mod.DatasetPrompts(ds, seed=1), trainer_mod.DatasetPrompts(ds, seed=1)
    ids = [[r.id for r in a.batch(s, 3)] for s in range(7)]  # 21 draws = 3 epochs
    assert [[r.id for r in b.batch(s, 3)] for s in (6, 0, 3)] == [ids[6], ids[0], ids[3]]  # order-free
    flat = [i for batch in ids for i in batch]
    assert all(sorted(flat[e * 7 : (e + 1) * 7]) == sorted(r.id for r in ds) for e in range(3))  # epochs
    assert flat[:7] != flat[7:14]  # reshuffled per epoch


def first_token_is_target(completions, completion_ids, **kwargs) -> list[float]:
    """0/1 reward: most groups of a random tiny policy are all-0 (advantage 0)."""
    return [float(bool(ids) and ids[0] == 3) for ids in completion_ids]


@pytest.mark.parametrize("aggregation,minibatch", [("token", 0), ("sequence", 8), ("constant", 0)])
def test_leaving_out_zero_advantage_rows_gives_the_same_update(make_trainer, aggregation, minibatch):
    """rl.skip_zero_advantage drops rows from the forward, not from the loss denominators: the weights
    after two steps match the run that trains on every row, while most rows were skipped."""
    from respec.tasks.reward import CombinedReward

    grads, stats = {}, {}
    for skip in (True, False):
        cfg = train_config(rollout={"prompts_per_step": 8, "group_size": 4},
                           rl={"aggregation": aggregation, "skip_zero_advantage": skip, "epochs": 2},
                           optim={"minibatch_size": minibatch, "micro_batch_size": 4, "lr": 1e-2})
        t = make_trainer(cfg, tiny_lm(std=0.3))
        t.reward = CombinedReward([("first", first_token_is_target, 1.0)])
        seen, step_fn = [], t.optimizer.step

        def recording_step(*args, _seen=seen, _step=step_fn, _model=t.model, **kwargs):
            _seen.append(torch.cat([p.grad.flatten() for p in _model.parameters()]))  # every parameter has one
            return _step(*args, **kwargs)

        t.optimizer.step = recording_step
        rows = [t.train_step(step) for step in range(2)]
        assert 0 < rows[0]["zero_std_fraction"] < 1, rows[0]["zero_std_fraction"]  # mixed: some rows train
        grads[skip] = seen
        stats[skip] = [(r["train_skipped_fraction"], r["loss"], r["grad_norm"]) for r in rows]
    assert [s[0] for s in stats[False]] == [0.0, 0.0] and stats[True][0][0] > 0.25, stats
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(stats[True], stats[False]):
        assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-7) and norm_a == pytest.approx(norm_b, rel=1e-4)
    # the same gradient at every optimizer step (a changed denominator would rescale it)
    assert len(grads[True]) == len(grads[False]) > 1
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item() + 1e-9)


def test_summary_states_the_success_bar_with_a_paired_comparison():
    from respec.rl.trainer import EvalResult, TrainSummary, paired_se

    before = EvalResult(0, 4, 0.5, 0.5, 0.5, 1.0, (1, 0, 1, 0))
    after = EvalResult(10, 4, 0.5, 0.75, 0.75, 1.0, (1, 1, 1, 0))
    # differences (0, 1, 0, 0): sample variance 0.25, se sqrt(0.25 / 4)
    assert paired_se(before, after) == pytest.approx(0.25)
    assert paired_se(before, EvalResult(10, 4, 0.5, 0.75, 0.75, 1.0)) is None  # no per-problem outcomes

    def lines(first, last, b, a):
        return TrainSummary(10, first, last, b, a, 1.0).success_lines()

    assert "met" in lines(0.30, 0.41, None, None)[0] and "NOT" not in lines(0.30, 0.41, None, None)[0]
    assert "NOT met" in lines(0.30, 0.39, None, None)[0]
    n = 1000
    b = EvalResult(0, n, 0.5, 0.40, 0.40, 1.0, (1,) * 400 + (0,) * 600)
    se = math.sqrt(0.45 * 0.55 / n)  # the larger of the two binomial SEs
    good = EvalResult(9, n, 0.5, 0.45, 0.45, 1.0, (1,) * 450 + (0,) * 550)  # +0.05 = 3.2 SE
    weak = EvalResult(9, n, 0.5, 0.44, 0.44, 1.0, (1,) * 440 + (0,) * 560)  # +0.04 = 2.6 SE (0.44's SE)
    assert 0.05 >= 3 * se
    assert lines(0.3, 0.3, b, good)[1].endswith(": met") and "paired z" in lines(0.3, 0.3, b, good)[1]
    assert lines(0.3, 0.3, b, weak)[1].endswith("NOT met")


def test_the_builtin_task_follows_the_data_config():
    """data.task_seed, data.family_mix and data.stratify_families reach the training stream; the
    held-out set is the task seed's and the mix's, stratified or not, and at least eval.heldout long."""
    from respec.rl.trainer import TaskPrompts
    from respec.tasks.arithmetic import ArithmeticTask

    plain = TaskPrompts.task_for(train_config(data={"task_seed": 3}, eval={"heldout": 1500}))
    strat = TaskPrompts.task_for(train_config(data={"task_seed": 3, "stratify_families": True}))
    rl_mix = dict(families=("add", "sub", "mul"), weights=(0.2, 0.6, 0.2))  # the default data.family_mix
    assert plain.problems(0, 40) == ArithmeticTask(seed=3, **rl_mix).problems(0, 40)
    assert strat.problems(0, 40) == ArithmeticTask(seed=3, stratified=True, **rl_mix).problems(0, 40) \
        != plain.problems(0, 40)
    assert plain.heldout_size == 1500 and strat.heldout(1000) == plain.heldout(1000)
    assert [r.prompt for r in TaskPrompts(strat).batch(2, 8)] == [p.prompt for p in strat.problems(16, 8)]
    own = TaskPrompts.task_for(train_config(data={"family_mix": ""}))  # empty: the task's own mix
    assert own.problems(0, 40) == ArithmeticTask().problems(0, 40) != TaskPrompts.task_for(train_config()).problems(0, 40)
    mixed = TaskPrompts.task_for(train_config(data={"family_mix": " sub=3, mul=1"}))
    fams = [p.family for p in mixed.problems(0, 400)]
    assert set(fams) == {"sub", "mul"} and 0.68 < fams.count("sub") / 400 < 0.82
    assert {p.family for p in mixed.heldout(200)} == {"sub", "mul"}  # the held-out set follows the mix


@pytest.mark.parametrize("mix", ["add=1,div=1", "add=1,add=2", "add", "add=x", "add=-1,sub=1", "add=0,sub=0",
                                 "add=inf"])
def test_family_mix_errors_name_the_key(mix):
    from respec.config import ConfigValueError

    with pytest.raises(ConfigValueError, match=r"data\.family_mix"):
        train_config(data={"family_mix": mix}).validate()
