"""The EAGLE head: cached engine-time drafting vs from-scratch and training-time computations,
the layer-choice rule, and the saved format with its load-time checks.

How the rounds are driven: `propose` is called exactly as the engine calls it (target_len L,
draft_len D from the previous round's committed_len), with ragged rows, different accept counts,
a plain (k = 0) round in between, a retired row compacted into another slot, and a 1-token prompt
(no target feature yet). The engine's verify pass is replaced by writing the accepted drafts and
one new token, with fresh random "true" features, into the row's buffers.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from respec.drafter import DraftContext, DrafterError, EagleDrafter, default_feature_layers, load_eagle, save_eagle
from respec.models.rope import cos_sin
from respec.rollout.sampling import SamplingParams, transform

from .conftest import VOCAB, tiny_head, tiny_target

T1 = SamplingParams(temperature=1.0)
ATOL = 1e-5


def _causal_forward(head, embeds, feats):
    """The head's layer over all entries at once, plain causal attention, no cache: (1, n, H)."""
    n = embeds.shape[1]
    cos, sin = cos_sin(head.inv_freq, 1.0, torch.arange(n)[None], embeds.dtype)  # the function, not the table
    xq, xk, xv = head._qkv(embeds, feats, cos, sin)
    y = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True, enable_gqa=True)
    return head._finish(feats, y)


@torch.no_grad()
def reference_round(head, target, tokens, feats, L, drafts, sampling=T1):
    """Draft distributions of a round at committed length L, recomputed from scratch: (k, V).

    Entries 0..L-1 pair the true fused feature f_i with token i+1; draft entry L+s-1 pairs the
    head's own output at the previous entry with draft d_s.
    """
    embeds = head.embed(target, tokens[None, 1 : L + 1])  # (1, L, H)
    fused = head.fc(feats[None, :L])  # (1, L, H)
    out = []
    for s in range(drafts.shape[0]):
        h = _causal_forward(head, embeds, fused)[:, -1:]  # (1, 1, H): the newest entry's output
        out.append(transform(head.logits(target, h)[0, 0], sampling).probs)
        embeds = torch.cat([embeds, head.embed(target, drafts[None, s : s + 1])], dim=1)
        fused = torch.cat([fused, h], dim=1)
    return torch.stack(out)


class Rows:
    """The engine's per-slot buffers for a handful of rows (tokens, true features, L, D)."""

    def __init__(self, prompt_lens, T, F_dim, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        S = len(prompt_lens)
        self.tokens = torch.randint(3, VOCAB, (S, T), generator=self.g)
        self.features = torch.randn(S, T, F_dim, generator=self.g)
        self.L = torch.tensor([n - 1 for n in prompt_lens])
        self.D = torch.zeros(S, dtype=torch.long)

    def ctx(self):
        return DraftContext(self.tokens, self.features, self.L.clone(), self.D.clone())

    def commit(self, prop, n_accepted):
        """Accept n_accepted[b] drafts and one more token per row (the verify outcome)."""
        for b, n in enumerate(n_accepted):
            L = int(self.L[b])
            self.tokens[b, L + 1 : L + 1 + n] = prop.tokens[b, :n]
            self.tokens[b, L + 1 + n] = int(torch.randint(3, VOCAB, (), generator=self.g))
            self.features[b, L : L + n + 1] = torch.randn(n + 1, self.features.shape[2], generator=self.g)
            self.L[b] = L + n + 1
        self.D[: len(n_accepted)] = prop.committed_len

    def plain(self):
        """A k = 0 round: one token each, the drafter is not called (its D stays behind)."""
        self.L += 1

    def move(self, src, dst):
        for buf in (self.tokens, self.features, self.L, self.D):
            buf[dst] = buf[src]


def _check_round(head, target, rows, prop, B, skip=()):
    for b in range(B):
        if b in skip:
            continue
        ref = reference_round(head, target, rows.tokens[b], rows.features[b], int(rows.L[b]), prop.tokens[b])
        torch.testing.assert_close(prop.probs[b], ref, atol=ATOL, rtol=0)


def test_incremental_drafting_equals_from_scratch_forward(target):
    head = tiny_head(target)
    F_dim = len(head.cfg.feature_layers) * target.cfg.hidden_size
    rows = Rows(prompt_lens=[4, 7, 2, 1], T=48, F_dim=F_dim)
    drafter = EagleDrafter(head, target)
    drafter.allocate(4, 48)
    g = torch.Generator().manual_seed(5)

    def propose(B, k):
        u = torch.rand(B, k, generator=g, dtype=torch.float64)
        ctx = rows.ctx()
        ctx.target_len, ctx.draft_len = ctx.target_len[:B], ctx.draft_len[:B]
        return drafter.propose(ctx, k, T1, u)

    # round 1: ragged catch-up from D = 0; the 1-token prompt (L = 0) has no feature yet
    prop = propose(4, 3)
    assert prop.ok.tolist() == [True, True, True, False]
    assert prop.committed_len.tolist() == [3, 6, 1, 0]
    _check_round(head, target, rows, prop, 4, skip=(3,))
    rows.commit(prop, [3, 0, 1, 0])
    # round 2: different catch-up counts (4, 1, 2, 1), shorter k
    prop = propose(4, 2)
    assert prop.ok.all()
    _check_round(head, target, rows, prop, 4)
    rows.commit(prop, [0, 2, 1, 2])
    # a plain round, then row 1 finishes and the last row moves into its slot
    rows.plain()
    drafter.move_rows([3], [1])
    rows.move(3, 1)
    # round 3: catch-up over entries computed before the move and after the plain round
    prop = propose(3, 4)
    assert prop.ok.all()
    _check_round(head, target, rows, prop, 3)
    rows.commit(prop, [4, 1, 0])
    prop = propose(3, 3)
    _check_round(head, target, rows, prop, 3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_train_forward_reproduces_engine_drafting(target, depth):
    """Step s of train_forward at entry L+s-2 == draft step s of a round starting at L, when the
    sequence continues with the drafted tokens (several rounds, one cached drafter)."""
    head = tiny_head(target)
    F_dim = len(head.cfg.feature_layers) * target.cfg.hidden_size
    rows = Rows(prompt_lens=[5, 3], T=40, F_dim=F_dim, seed=2)
    drafter = EagleDrafter(head, target)
    drafter.allocate(2, 40)
    g = torch.Generator().manual_seed(7)
    for n_accepted in ([1, 3], [0, 2], [3, 0], [2, 2]):
        prop = drafter.propose(rows.ctx(), 3, T1, torch.rand(2, 3, generator=g, dtype=torch.float64))
        for b in range(2):
            L = int(rows.L[b])
            seq = torch.cat([rows.tokens[b, : L + 1], prop.tokens[b]])[None]  # prefix, pending, d_1..d_3
            feats = rows.features[b : b + 1, : L + 4].clone()
            feats[:, L:] = 100 * torch.randn(1, 4, F_dim)  # not known at round start: no step may read them
            with torch.no_grad():
                outs = head.train_forward(target, seq, feats, depth)
            assert len(outs) == depth
            for s in range(1, depth + 1):
                train_probs = outs[s - 1][0, L + s - 2].softmax(-1)
                torch.testing.assert_close(train_probs, prop.probs[b, s - 1], atol=ATOL, rtol=0)
        rows.commit(prop, n_accepted)


def test_layer_choice_rule():
    assert default_feature_layers(2) == (0, 1, 1)  # repeats allowed for shallow targets
    assert default_feature_layers(1) == (0, 0, 0)
    assert default_feature_layers(6) == (1, 3, 5)
    assert default_feature_layers(32) == (8, 16, 31)
    for n in range(1, 40):
        layers = default_feature_layers(n)
        assert len(layers) == 3 and list(layers) == sorted(layers) and 0 <= layers[0] and layers[-1] < n


def test_two_layer_target_features_feed_the_head(target):
    head = tiny_head(target)
    out = target(torch.randint(0, VOCAB, (2, 6)), hidden_layers=head.cfg.feature_layers)
    assert out.hidden.shape == (2, 6, 3 * target.cfg.hidden_size) == (2, 6, head.fc.in_features)
    torch.testing.assert_close(out.hidden[..., 64:128], out.hidden[..., 128:])  # layer 1 twice


def test_distillation_never_writes_gradients_into_the_actor(target):
    target.requires_grad_(True)
    head = tiny_head(target)
    feats = torch.randn(2, 9, head.fc.in_features)
    outs = head.train_forward(target, torch.randint(0, VOCAB, (2, 9)), feats, 2)
    sum(o.logsumexp(-1).sum() for o in outs).backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in head.parameters())


def test_save_load_round_trip(target, tmp_path):
    head = tiny_head(target, actor=str(tmp_path / "actor-a"))
    path = save_eagle(head, tmp_path / "drafter", extra_files={"notes.json": "{}"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "notes.json"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(head.state_dict())
    assert not any("embed" in k or "lm_head" in k for k in keys)  # shared with the actor, never stored
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "eagle3" and cfg["actor"] == str(tmp_path / "actor-a")
    loaded = load_eagle(path, target, actor=str(tmp_path / "actor-a"))
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert loaded.cfg == head.cfg


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("hidden", "hidden size 64 != actor hidden size 32"),
        ("vocab", "vocabulary 40 != actor vocabulary 41"),
        ("actor", "trained against actor"),
        ("truncated", "model.safetensors: truncated or corrupt"),
        ("config", "config.json: cannot be read"),
    ],
)
def test_load_errors_name_the_problem(target, tmp_path, problem, expected):
    path = save_eagle(tiny_head(target, actor="/runs/actor-a"), tmp_path / "drafter")
    actor = "/runs/actor-a"
    if problem == "hidden":
        target = tiny_target(hidden_size=32)
    elif problem == "vocab":
        target = tiny_target(vocab_size=VOCAB + 1)
    elif problem == "actor":
        actor = "/runs/actor-b"
    elif problem == "truncated":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif problem == "config":
        (path / "config.json").write_text("{not json")
    with pytest.raises(DrafterError, match=expected) as err:
        load_eagle(path, target, actor=actor)
    assert str(path) in str(err.value)
