"""Rewards: exact-answer rule, loading by import path, weighted combination, errors that say where."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from respec.tasks import (
    ArithmeticTask, CombinedReward, RewardError, RewardFunction, exact_answer_reward, load_reward_fn, parse_answer,
)


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("5+7+0=12\n=12\nans 12", 1.0),
        ("ans 12", 1.0),
        ("ans 12\n", 1.0),  # trailing whitespace is ignored
        ("ans 12  \n\n", 1.0),
        ("ans 13", 0.0),  # wrong
        ("ans 012", 0.0),  # exact string, no numeric normalisation
        ("ans  12", 0.0),
        ("ans 12 because 5+7=12", 0.0),  # extra text on the answer line
        ("ans 12\nthat is all", 0.0),  # text after the answer line
        ("ans 12<eos>", 0.0),  # decode with skip_special_tokens=True
        ("ans 11\nans 12", 0.0),  # more than one answer line: no hedging
        ("12", 0.0),  # no marker
        ("the answer is ans 12", 0.0),  # marker not at line start
        ("", 0.0),
        ("+-*=\n==", 0.0),
    ],
)
def test_exact_answer_rule(completion, reward):
    assert exact_answer_reward([completion], answer=["12"]) == [reward]


def test_task_solutions_score_one_and_answers_may_be_ints():
    problems = ArithmeticTask(seed=2).problems(0, 300)
    assert exact_answer_reward([p.solution for p in problems], [p.answer for p in problems]) == [1.0] * 300
    assert exact_answer_reward(["ans 7"], [7], prompts=["Q: 3+4=\n"], extra=[None]) == [1.0]
    assert parse_answer("1+1+0=2\nans 2") == "2" and parse_answer("no answer") is None


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_penalty(completions, **kwargs):
            return [-len(c) / 100 for c in completions]

        class Scorers:
            @staticmethod
            def const(completions, **kwargs):
                return [0.5] * len(completions)

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_reward_fn_by_path(reward_module):
    assert load_reward_fn("exact_answer") is exact_answer_reward
    assert load_reward_fn("respec.tasks.reward:exact_answer_reward") is exact_answer_reward
    assert load_reward_fn("respec.tasks.reward.exact_answer_reward") is exact_answer_reward
    assert load_reward_fn("my_rewards:length_penalty")(["abcd"]) == [-0.04]
    assert load_reward_fn("my_rewards.length_penalty")(["ab"]) == [-0.02]
    assert load_reward_fn("my_rewards:Scorers.const")(["a", "b"]) == [0.5, 0.5]
    assert load_reward_fn(f"{reward_module / 'my_rewards.py'}:length_penalty")(["a"]) == [-0.01]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("no_such_pkg_xyz.mod.f", "no module named 'no_such_pkg_xyz'"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "not callable"),
        ("justaname", "not a built-in reward"),
        ("/nonexistent/file.py:f", "does not exist"),
    ],
)
def test_load_reward_fn_errors(reward_module, spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward_fn(spec)


def _batch(n=4):
    return dict(
        completions=["ans 3", "ans 4", "garbage", "ans 3"],
        prompts=["Q: 1+2=\n", "Q: 1+2=\n", "Q: 2+2=\n", "Q: 2+2=\n"],
        completion_ids=[[1, 2], [3], [], [4, 5, 6]],
        columns={"answer": ["3", "3", "4", "4"]},
        record_ids=["p0", "p0", "p1", "p1"],
        step=7,
    )


def test_combined_reward_weights_and_arguments():
    seen = {}

    def spy(completions, prompts, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completion_ids=completion_ids, answer=answer, kwargs=kwargs)
        return [float(len(ids)) for ids in completion_ids]

    combined = CombinedReward([("exact", exact_answer_reward, 1.0), RewardFunction("ids", spy, 0.5)])
    result = combined(**_batch())
    assert result.names == ("exact", "ids") and result.weights == (1.0, 0.5)
    assert result.scores.shape == (4, 2) and result.scores.dtype == torch.float32
    torch.testing.assert_close(result.scores[:, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(result.total, torch.tensor([2.0, 0.5, 0.0, 1.5]))
    assert seen["answer"] == ["3", "3", "4", "4"] and seen["completion_ids"][3] == [4, 5, 6]
    assert seen["prompts"][2] == "Q: 2+2=\n" and seen["kwargs"] == {}


def test_combined_reward_from_specs():
    combined = CombinedReward.from_specs(["exact_answer", "respec.tasks.reward:exact_answer_reward"], [1.0, -1.0])
    assert combined(**_batch()).total.tolist() == [0.0] * 4
    with pytest.raises(RewardError, match="weights"):
        CombinedReward.from_specs(["exact_answer"], [1.0, 2.0])
    with pytest.raises(RewardError, match="unique"):
        CombinedReward([("a", exact_answer_reward, 1.0), ("a", exact_answer_reward, 1.0)])


def _raises(completions, **kwargs):
    raise ZeroDivisionError("boom")


def _short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def _string_at_p1(completions, **kwargs):
    return [1.0, 1.0, "1.0", 0.0]


def _none_at_p1(completions, **kwargs):
    return [1.0, 1.0, 1.0, None]


def _nan_at_p1(completions, **kwargs):
    return [0.0, 0.0, math.nan, 0.0]


def _inf_at_p0(completions, **kwargs):
    return torch.tensor([0.0, math.inf, 0.0, 0.0])


def _not_a_list(completions, **kwargs):
    return 1.0


def _no_kwargs(completions):
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    "fn, message, ids",
    [
        (_raises, "raised ZeroDivisionError: boom", "p0, p1"),
        (_short, "returned 3 values for 4 completions", "p0, p1"),
        (_string_at_p1, "returned a str", "p1"),
        (_none_at_p1, "returned a NoneType", "p1"),
        (_nan_at_p1, "non-finite value nan", "p1"),
        (_inf_at_p0, "non-finite value inf", "p0"),
        (_not_a_list, "returned a float", "p0, p1"),
        (_no_kwargs, "unexpected keyword argument", "p0, p1"),
    ],
)
def test_reward_errors_name_function_prompt_and_step(fn, message, ids):
    combined = CombinedReward([("exact", exact_answer_reward, 1.0), ("user_fn", fn, 1.0)])
    with pytest.raises(RewardError) as info:
        combined(**_batch())
    text = str(info.value)
    assert "'user_fn'" in text and message in text and "step 7" in text and f"prompts {ids})" in text


def test_column_length_mismatch_is_a_caller_error():
    batch = _batch()
    batch["columns"] = {"answer": ["3"]}
    with pytest.raises(ValueError, match="column 'answer'"):
        CombinedReward([("exact", exact_answer_reward, 1.0)])(**batch)
