"""Greedy decoding: speculative == plain == transformers `generate`, token for token, per family;
and ragged batches give every row exactly what it gets when run alone."""

from __future__ import annotations

import pytest
import torch

from respec.drafter import DraftModelDrafter, EagleConfig, EagleDrafter, EagleHead
from respec.models import load_pretrained
from respec.rollout.engine import Engine, Request, StaticK
from respec.rollout.sampling import SamplingParams
from tests.conftest import make_hf_model

GREEDY = SamplingParams(temperature=0.0)


def hf_greedy_reference(hf, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """HF greedy continuation, cut where HF's own top-2 logit margin falls below 1e-4 (a tie)."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, top_k=None, top_p=None,
                      temperature=None, eos_token_id=eos, pad_token_id=eos,
                      output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    for i, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        if float(top2[0] - top2[1]) < 1e-4:
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_generate(family, tmp_path):
    hf, path = make_hf_model(family, tmp_path, seed=5)
    with torch.no_grad():  # sharpen the random model so greedy continuations are not all ties
        for p in hf.parameters():
            p.mul_(4.0)
    hf.save_pretrained(path)
    pre = load_pretrained(path)
    model, eos = pre.model, pre.eos_token_ids[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 9, 5, 14, 1, 7)]
    reqs = [Request(str(i), tuple(p), 0, 24) for i, p in enumerate(prompts)]
    head = EagleHead(EagleConfig.for_target(model.cfg)).init_weights(torch.Generator().manual_seed(1), std=0.2)
    runs = {
        "plain": Engine(model, eos_token_ids=[eos]).generate(reqs, GREEDY),
        "draft_lm": Engine(model, eos_token_ids=[eos], drafter=DraftModelDrafter(model), policy=StaticK(3)).generate(reqs, GREEDY),
        "eagle": Engine(model, eos_token_ids=[eos], drafter=EagleDrafter(head, model), policy=StaticK(4), max_batch=4).generate(reqs, GREEDY),
    }
    compared = 0
    for i, p in enumerate(prompts):
        ref = hf_greedy_reference(hf, p, 24, eos)
        for name, res in runs.items():
            got = res.rollouts[i].token_ids
            assert got[: len(ref)] == ref, (name, i)
        assert runs["plain"].rollouts[i].token_ids == runs["eagle"].rollouts[i].token_ids
        assert runs["plain"].rollouts[i].token_ids == runs["draft_lm"].rollouts[i].token_ids
        compared += len(ref)
    assert compared >= 60  # the tie rule must not hollow the comparison out
    assert runs["draft_lm"].mean_accept_len > 3.5  # self-draft: greedy drafts always accepted


def test_ragged_rows_equal_each_row_alone():
    """Forced accept/reject mixes, budget clipping and stops mid-draft: batch == alone, token for
    token and log-prob for log-prob (randomness is keyed per request, never by batch slot)."""
    from respec.bench.lossless import perturbed, tiny_lm

    target = tiny_lm(0)
    drafter = DraftModelDrafter(perturbed(target, 0.08, 1))
    g = torch.Generator().manual_seed(3)
    reqs = [
        Request(f"r{i}", tuple(torch.randint(0, 12, (1 + i % 5,), generator=g).tolist()), i % 2, 5 + 3 * i)
        for i in range(12)
    ]
    sampling = SamplingParams(0.8, top_p=0.95)
    eng = Engine(target, eos_token_ids=[4], drafter=drafter, policy=StaticK(3), max_batch=5, seed=9)
    batch = eng.generate(reqs, sampling)
    reasons = {r.finish_reason for r in batch.rollouts}
    assert reasons == {"stop", "length"}
    for r, req in zip(batch.rollouts, reqs):
        alone = eng.generate([req], sampling).rollouts[0]
        assert r.token_ids == alone.token_ids
        assert max((abs(a - b) for a, b in zip(r.logprobs, alone.logprobs)), default=0.0) < 1e-5
        assert len(r.token_ids) <= req.max_new_tokens
