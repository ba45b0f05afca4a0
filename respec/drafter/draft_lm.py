"""A standalone small draft language model behind the drafter interface (classic two-model SD).

It shares the actor's tokenizer and reads only tokens: entry i is token i at position i and
predicts token i+1. Each round it catches up over the tokens [draft_len, L] (the last one is the
pending token at L) in one ragged forward, then drafts k tokens; `committed_len` = L + 1. This is
also what transformers' assisted generation uses, so it is the comparison point there.
"""

from __future__ import annotations

import torch

from ..models.transformer import Transformer
from ..rollout.sampling import SamplingParams
from .base import DraftContext, Proposal, sample_drafts_step


class DraftModelDrafter:
    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cache = None

    def allocate(self, max_rows: int, max_len: int) -> None:
        self.cache = self.model.new_cache(max_rows, max_len)

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        self.cache.move_rows(src, dst)

    @torch.no_grad()
    def propose(self, ctx: DraftContext, k: int, sampling: SamplingParams, u_draft: torch.Tensor) -> Proposal:
        B = ctx.target_len.shape[0]
        L, D = ctx.target_len, ctx.draft_len
        count = L - D + 1  # tokens [D, L] inclusive
        c = int(count.max())
        rows = torch.arange(B, device=L.device)[:, None]
        pos = (D[:, None] + torch.arange(c, device=L.device)).clamp(max=ctx.tokens.shape[1] - 1)
        out = self.model(ctx.tokens[rows, pos], start=D, cache=self.cache, logits_index=count - 1)
        logits = out.logits[:, 0]  # (B, V) predicts the token at L + 1
        toks, probs, oks = [], [], []
        for s in range(k):
            tok, pr, ok = sample_drafts_step(logits, sampling, u_draft[:, s])
            toks.append(tok), probs.append(pr), oks.append(ok)
            if s + 1 < k:
                logits = self.model(tok[:, None], start=L + 1 + s, cache=self.cache).logits[:, 0]
        return Proposal(
            tokens=torch.stack(toks, 1), probs=torch.stack(probs, 1),
            ok=torch.stack(oks, 1).all(1), committed_len=L + 1,
        )
