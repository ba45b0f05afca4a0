"""Distillation: the loss is aligned with what the engine verifies, it learns, sample weights work,
and `respec distill` runs end to end on a tiny saved actor."""

from __future__ import annotations

import json

import pytest
import torch

from respec.drafter import EagleDrafter, load_eagle
from respec.drafter.base import DraftContext
from respec.drafter.distill import (
    DistillConfig,
    Sample,
    TeacherPool,
    collect_samples,
    distill_loss,
    measure_acceptance,
    run_distill,
    teacher_force,
)
from respec.rollout.sampling import SamplingParams
from respec.rollout.speculative import acceptance_rate

from .conftest import EOS, VOCAB, tiny_head, tiny_target


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 8, (n,), generator=g)]


def test_collect_and_teacher_force_layout(target):
    pool = collect_samples(target, None, _prompts(3, 0), n_per_prompt=2, max_new_tokens=6, seed=0)
    assert len(pool) == 6 and all(len(s.tokens) <= s.prompt_len + 6 for s in pool)
    tb = teacher_force(target, pool, (0, 1, 1))
    B, T = tb.tokens.shape
    assert tb.features.shape == (B, T, 3 * 64) and tb.logprobs.shape == (B, T, VOCAB)
    for b, s in enumerate(pool):
        assert tb.tokens[b, : len(s.tokens)].tolist() == list(s.tokens)
        assert tb.loss_mask[b].nonzero()[:, 0].tolist() == list(range(s.prompt_len - 1, len(s.tokens) - 1))
    torch.testing.assert_close(tb.logprobs.exp().sum(-1), torch.ones(B, T))


def test_teacher_pool_batches_equal_a_per_batch_teacher_force(target):
    """The pool forwarded once (length-sorted chunks) serves any batch of it as teacher_force would."""
    pool = collect_samples(target, None, _prompts(9, 5), n_per_prompt=2, max_new_tokens=10, seed=5)
    assert len({len(s.tokens) for s in pool}) > 3  # ragged, so chunks and batches pad differently
    tp = TeacherPool(target, pool, (0, 1, 1), pad_id=0, chunk=4)
    for rows in ([0, 5, 11, 17], [3], list(range(18))[::-1]):
        got, want = tp.batch(rows), teacher_force(target, [pool[i] for i in rows], (0, 1, 1), pad_id=0)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.loss_mask, want.loss_mask)
        assert torch.equal(got.lengths, want.lengths)
        valid = torch.arange(want.tokens.shape[1])[None, :] < want.lengths[:, None]
        for g, w in ((got.features[valid], want.features[valid]), (got.logprobs[valid], want.logprobs[valid])):
            # fp32 summation order only: 2e-5 relative, 1e-6 of the scale (this random target's features reach ~300)
            torch.testing.assert_close(g, w, atol=1e-6 * float(w.abs().max()), rtol=2e-5)
        assert not got.features[~valid].any()  # padding is zeros, never another row's values


def test_loss_is_aligned_with_the_engine_round(target):
    """Step s of the loss at a round starting at L scores exactly the draft the engine verifies
    against the actor's distribution at position L+s-1: alpha equals acceptance_rate of the two."""
    head = tiny_head(target)
    prompt = _prompts(1, 3)[0] + [4, 9, 17, 22]
    L = len(prompt) - 1
    # the drafts of one engine round, with true features from a teacher-forced pass over the prompt
    tb0 = teacher_force(target, [Sample(tuple(prompt), 2)], head.cfg.feature_layers)
    drafter = EagleDrafter(head, target)
    drafter.allocate(1, 32)
    ctx = DraftContext(tb0.tokens, tb0.features, torch.tensor([L]), torch.tensor([0]))
    prop = drafter.propose(ctx, 3, SamplingParams(1.0), torch.rand(1, 3, dtype=torch.float64))
    seq = Sample(tuple(prompt) + tuple(prop.tokens[0].tolist()), 2)
    tb = teacher_force(target, [seq], head.cfg.feature_layers)
    for s in range(1, 4):
        mask = torch.zeros_like(tb.loss_mask)
        mask[0, L + s - 1] = True  # the actor's law of token L+s
        _, stats = distill_loss(head, target, tb.tokens, tb.features, tb.logprobs, mask, depth=3)
        actor_probs = tb.logprobs[0, L + s - 1].exp()
        expected = float(acceptance_rate(actor_probs, prop.probs[0, s - 1]))
        assert stats["alpha"][s - 1] == pytest.approx(expected, abs=1e-5)
        ce = -(actor_probs * prop.probs[0, s - 1].log()).sum()
        assert stats["ce"][s - 1] == pytest.approx(float(ce), abs=1e-4)


def test_zero_sample_weight_removes_the_sample(target):
    head = tiny_head(target).train()
    pool = collect_samples(target, None, _prompts(3, 1), n_per_prompt=1, max_new_tokens=8, seed=1)
    tb = teacher_force(target, pool, head.cfg.feature_layers)

    def grads(rows, weight, logprobs):
        head.zero_grad(set_to_none=True)
        loss, _ = distill_loss(head, target, tb.tokens[rows], tb.features[rows], logprobs[rows], tb.loss_mask[rows],
                               depth=3, sample_weight=weight)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters()]

    noisy = tb.logprobs.clone()
    noisy[1] = torch.randn_like(noisy[1]).log_softmax(-1)  # a different target for the zero-weight row
    loss_w, g_w = grads([0, 1, 2], torch.tensor([1.0, 0.0, 1.0]), noisy)
    loss_s, g_s = grads([0, 2], None, tb.logprobs)
    torch.testing.assert_close(loss_w, loss_s)
    for a, b in zip(g_w, g_s):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    loss_1, g_1 = grads([0, 1, 2], torch.tensor([1.0, 1.0, 1.0]), noisy)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(g_1, g_s))


def test_distillation_raises_acceptance():
    target = tiny_target(seed=0)
    prompts = _prompts(16, 1)
    pool = collect_samples(target, None, prompts[:8], n_per_prompt=4, max_new_tokens=24, seed=0)
    head = tiny_head(target, seed=0, std=0.02)
    tb = teacher_force(target, pool, head.cfg.feature_layers)
    held = prompts[8:]
    tau_before = measure_acceptance(target, head, held, [EOS], max_new_tokens=24, seed=5)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    head.train()
    history = []
    for _ in range(40):
        loss, stats = distill_loss(head, target, tb.tokens, tb.features, tb.logprobs, tb.loss_mask, depth=3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(stats)
    tau_after = measure_acceptance(target, head, held, [EOS], max_new_tokens=24, seed=5)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    for s in range(3):
        assert last["alpha"][s] > first["alpha"][s] + 0.1
    assert tau_after > tau_before + 0.05


def _tiny_actor_dir(tmp_path):
    from respec.models import ModelConfig, Transformer, save_pretrained
    from respec.tasks.pretrain import task_tokenizer
    from respec.tasks.tokenizer import EOS as EOS_TOKEN
    from respec.tasks.tokenizer import PAD, VOCAB as TASK_VOCAB

    cfg = ModelConfig(arch="qwen2", vocab_size=len(TASK_VOCAB), hidden_size=64, intermediate_size=112, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                      eos_token_ids=(TASK_VOCAB.index(EOS_TOKEN),), pad_token_id=TASK_VOCAB.index(PAD))
    model = Transformer(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return save_pretrained(model, tmp_path / "actor-tiny", tokenizer=task_tokenizer()), model


def test_distill_cli_writes_a_loadable_drafter(tmp_path, capsys):
    from respec.cli import main

    actor_dir, model = _tiny_actor_dir(tmp_path)
    out = tmp_path / "drafter"
    rc = main(["distill", "--model", str(actor_dir), "--max-steps", "3", "--output", str(out),
               "--num-prompts", "4", "--samples-per-prompt", "2", "--batch-size", "4", "--max-new-tokens", "12",
               "--eval-prompts", "2", "--refresh", "2"])
    assert rc == 0
    assert "held-out mean acceptance length" in capsys.readouterr().out
    head = load_eagle(out, model.eval(), actor=str(actor_dir))
    assert head.cfg.actor == str(actor_dir.resolve())
    meta = json.loads((out / "respec_distill.json").read_text())
    assert meta["steps"] == 3 and meta["tau_after"] >= 1.0


def test_distill_from_a_prompt_file(tmp_path):
    actor_dir, _ = _tiny_actor_dir(tmp_path)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"prompt": "Q: 1+2=\n"}, {"prompt_ids": [1, 5, 6, 7]}, {"prompt": "Q: 3*4=\n"}]))
    cfg = DistillConfig(model=str(actor_dir), data=str(data), output=str(tmp_path / "d"), max_steps=2, batch_size=2,
                        num_prompts=2, samples_per_prompt=1, max_new_tokens=8, eval_prompts=1)
    rep = run_distill(cfg, progress=False)
    assert rep.steps == 2 and rep.tau_before is not None and (tmp_path / "d" / "model.safetensors").is_file()


def test_distill_config_errors_name_the_key(tmp_path):
    from respec.cli import main

    assert main(["distill", "--max-steps", "3"]) == 2  # no --output
    with pytest.raises(ValueError, match="depth"):
        DistillConfig(output="x", depth=0).validate()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1+2=\\n"}\n{"text": 3}\n')
    actor_dir, _ = _tiny_actor_dir(tmp_path)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed row"):
        run_distill(DistillConfig(model=str(actor_dir), data=str(bad), output=str(tmp_path / "d")), progress=False)
