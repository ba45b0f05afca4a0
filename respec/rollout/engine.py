"""The rollout engine: batched plain and speculative decoding over ragged rows (the hot loop).

Engine = request state + policy + executor (nano-vllm's decomposition). Each iteration reads:
admit rows, ask the policy for k (0 = plain), draft k tokens, verify k+1 positions in one target
forward, accept/resample (speculative.verify_drafts), commit or roll back by a length write,
collect finished rows.

Row state lives in preallocated per-slot tensors; active rows occupy slots [0, n). Per row:
  target_len  L: tokens in the target KV cache; the *pending* token (last emitted, not yet fed)
                 sits at position L of `tokens`. A round feeds [pending, d_1..d_k] at L..L+k.
  draft_len      drafter entries computed from true data (its own convention, see drafter/base.py)
  features       target hidden features at committed positions (for the EAGLE drafter and for
                 catching the drafter up after plain-mode iterations)

Randomness is keyed per request (seed, prompt id, sample index) and indexed by absolute position
and lane (rng.py): the draft for position p uses (LANE_DRAFT, p), its accept test (LANE_ACCEPT, p),
and a resampled/bonus token emitted at p uses (LANE_SAMPLE, p). A position's uniforms decide
something only in the round that commits that position (drafts past a rejection are discarded
unseen), so every decision uses a fresh uniform, and a row's samples never depend on what else
is in the batch.

Lossless by construction: every emitted token is drawn from (or accepted against) the transformed
target distribution of the verify pass that produced it, and its recorded log-prob is the log of
that same distribution (the RL loss's old log-prob, no extra forward).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from ..models.transformer import Transformer
from . import rng
from .drafting import DraftContext
from .sampling import SamplingParams, check_finite, sample, transform
from .speculative import Verdict, verify_drafts


class EngineError(ValueError):
    pass


# How each emitted token came to be (Rollout.sources): a plain sample (k = 0 round), an accepted
# draft, a sample from the residual after a rejection, or the bonus token after k_b accepts.
SOURCE_PLAIN, SOURCE_ACCEPTED, SOURCE_RESAMPLED, SOURCE_BONUS = 0, 1, 2, 3


def truncate_at_stop(tokens: torch.Tensor, n_emit: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stop token inside the emitted run ends the row there and drops the rest.

    tokens (B, k+1), n_emit (B,) -> (n_emit truncated to include the first stop token, stopped (B,) bool)
    """
    j = torch.arange(tokens.shape[1], device=tokens.device)
    is_eos = torch.isin(tokens, eos) & (j[None, :] < n_emit[:, None])
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(n_emit, tokens.shape[1]))
    return torch.minimum(n_emit, first + 1), first < tokens.shape[1]


@dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: tuple[int, ...]
    sample_index: int = 0
    max_new_tokens: int = 128


@dataclass
class Rollout:
    """One generated response and what the trainer needs from it."""

    request: Request
    token_ids: list[int] = field(default_factory=list)  # includes the stop token when one ended the row
    logprobs: list[float] = field(default_factory=list)  # log-prob under the distribution it was sampled from
    nucleus_sizes: list[int] = field(default_factory=list)  # top-p/top-k support size behind each token
    sources: list[int] = field(default_factory=list)  # per token: SOURCE_PLAIN / _ACCEPTED / _RESAMPLED / _BONUS
    round_slots: list[int] = field(default_factory=list)  # per token: its index within its verify round (0..k)
    finish_reason: str = ""  # "stop" | "length"
    drafted: int = 0  # draft tokens verified for this row
    accepted: int = 0  # of which accepted
    rounds: int = 0  # verify passes (target forwards) this row took part in


@dataclass
class RoundStats:
    """One decode iteration (one target forward over the active batch)."""

    active: int  # rows in the batch
    k: int  # draft length chosen for the round (0 = plain)
    drafted: int  # draft tokens verified, summed over rows
    accepted: int  # accepted drafts, summed over rows
    emitted: int  # tokens committed (accepted drafts + resampled/bonus)
    accepted_at: list[int]  # (k,) rows whose draft at position j+1 was accepted
    drafted_at: list[int]  # (k,) rows that had a draft at position j+1
    drafted_per_row: list[int]  # (active,) drafts verified per row (k_b)
    accepted_per_row: list[int]  # (active,) accepted drafts per row (cut at a stop token)
    fallback_rows: int  # rows whose drafter gave non-finite logits (ran plain this round)
    draft_s: float
    verify_s: float
    round_s: float = 0.0  # the whole iteration after admission: draft, verify, commit, bookkeeping


@dataclass
class GenerationResult:
    rollouts: list[Rollout]
    rounds: list[RoundStats]
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rollouts)

    @property
    def mean_accept_len(self) -> float:
        """Tokens emitted per (row, verify pass): EAGLE's tau, 1.0 for plain decoding."""
        rows = sum(r.active for r in self.rounds)
        return sum(r.emitted for r in self.rounds) / max(rows, 1)


class SpecPolicy(Protocol):
    """Chooses the draft length for the next iteration (0 = plain) from the active batch and the
    context (the longest active row's length). Static or adaptive."""

    def choose(self, active: int, context: int) -> int: ...

    def observe(self, stats: RoundStats) -> None: ...


@dataclass
class StaticK:
    k: int = 0

    def choose(self, active: int, context: int = 0) -> int:
        return self.k

    def observe(self, stats: RoundStats) -> None:
        pass


# A capture hook receives two kinds of events. At admission, a `Prefill` per batch of admitted
# rows: the target features of their prompts (the drafter reads the prompt as context, so a learner
# of it must see it too). Per round, a `Commit`: (slots' request indices, positions, features (N, F)
# or None, target probs (N, V), tokens (N,)). The online learner builds on both.
CaptureFn = Callable[["Prefill | Commit"], None]


@dataclass
class Prefill:
    rollout_index: torch.Tensor  # (N,) index into the request list
    features: torch.Tensor | None  # (N, P, F) target features at prompt inputs 0..len_i-1; a view
    #                                 of the engine's buffer (copy what you keep); undefined past len_i
    lengths: torch.Tensor  # (N,) prompt tokens prefilled per row (the prompt length - 1: the last
    #                        prompt token is the first committed input, whose feature a Commit carries)


@dataclass
class Commit:
    rollout_index: torch.Tensor  # (N,) index into the request list
    positions: torch.Tensor  # (N,) position of the committed token's *input* (feature position)
    features: torch.Tensor | None  # (N, F) target features at those positions
    target_probs: torch.Tensor  # (N, V) transformed target distribution for the next token
    next_tokens: torch.Tensor  # (N,) the token committed after that position


class Engine:
    def __init__(
        self,
        model: Transformer,
        *,
        eos_token_ids: Sequence[int] = (),
        drafter=None,
        policy: SpecPolicy | None = None,
        max_batch: int = 64,
        max_context: int | None = None,
        seed: int = 0,
        capture: CaptureFn | None = None,
        feature_layers: Sequence[int] | None = None,
    ) -> None:
        self.model = model  # the live actor: the trainer updates it in place, no stale copy
        self.eos = torch.tensor(sorted(set(eos_token_ids)) or [-1], dtype=torch.long, device=model.device)
        self.drafter = drafter
        self.policy = policy or StaticK(0)
        self.max_batch = max_batch
        self.max_context = max_context or model.cfg.max_position_embeddings
        self.seed = seed
        self.capture = capture
        # target layers whose outputs are kept per committed position: what the drafter consumes
        # (also in plain iterations, so a drafter switched on later can catch up), or what a
        # capture hook asks for without a drafter
        self.feature_layers = tuple(feature_layers if feature_layers is not None else getattr(drafter, "feature_layers", ()))

    # ---- public API -----------------------------------------------------------------------------
    def make_requests(
        self, prompts: Sequence[tuple[str, Sequence[int]]], n: int = 1, max_new_tokens: int = 128
    ) -> list[Request]:
        return [
            Request(str(pid), tuple(int(t) for t in ids), s, max_new_tokens)
            for pid, ids in prompts
            for s in range(n)
        ]

    @torch.no_grad()
    def generate(
        self, requests: Sequence[Request], sampling: SamplingParams, *, progress: Callable[[int], None] | None = None
    ) -> GenerationResult:
        t0 = time.perf_counter()
        for r in requests:
            if not r.prompt_ids:
                raise EngineError(f"request {r.id!r}: empty prompt")
            if len(r.prompt_ids) + r.max_new_tokens > self.max_context:
                raise EngineError(
                    f"request {r.id!r}: prompt of {len(r.prompt_ids)} tokens + max_new_tokens "
                    f"{r.max_new_tokens} exceeds the context limit of {self.max_context}"
                )
            if max(r.prompt_ids) >= self.model.cfg.vocab_size or min(r.prompt_ids) < 0:
                raise EngineError(f"request {r.id!r}: token id outside the model's vocabulary")
        state = _BatchState(self, requests, sampling)
        while state.step():
            if progress is not None:
                progress(state.finished_count)
        return GenerationResult(state.rollouts, state.rounds, time.perf_counter() - t0)


class _BatchState:
    """Per-generate-call state: slots, lengths, buffers, and the loop body."""

    def __init__(self, engine: Engine, requests: Sequence[Request], sampling: SamplingParams) -> None:
        self.e = engine
        self.sampling = sampling
        self.requests = list(requests)
        self.rollouts = [Rollout(r) for r in self.requests]
        self.rounds: list[RoundStats] = []
        self.queue = list(range(len(self.requests)))[::-1]  # pop() admits in order
        model = engine.model
        dev = model.device
        self.dev = dev
        rows = min(engine.max_batch, len(self.requests))
        max_k = 16
        self.T = max((len(r.prompt_ids) + r.max_new_tokens for r in self.requests), default=1) + max_k + 2
        self.cache = model.new_cache(rows, self.T)
        self.tokens = torch.zeros(rows, self.T, dtype=torch.long, device=dev)  # (S, T)
        self.features = None
        if engine.feature_layers:
            F = len(engine.feature_layers) * model.cfg.hidden_size
            self.features = torch.zeros(rows, self.T, F, dtype=model.dtype, device=dev)  # (S, T, F)
        self.target_len = torch.zeros(rows, dtype=torch.long, device=dev)
        self.draft_len = torch.zeros(rows, dtype=torch.long, device=dev)
        self.generated = torch.zeros(rows, dtype=torch.long, device=dev)
        self.budget = torch.zeros(rows, dtype=torch.long, device=dev)
        self.keys = torch.zeros(rows, dtype=torch.long, device=dev)
        # every uniform a row can need, drawn once at admission: (S, 3 lanes, T positions) float64.
        # The keyed hash is the same one rng.uniforms computes per call; a table turns ~40 small
        # integer ops per iteration into one gather.
        self.u_table = torch.zeros(rows, 3, self.T, dtype=torch.float64, device=dev)
        self.slot_req: list[int] = []  # request index of each active slot
        self.finished_count = 0
        if engine.drafter is not None:
            engine.drafter.allocate(rows, self.T)

    # ---- admission: prefill new rows, sharing one prefill among identical prompts ---------------
    def admit(self) -> None:
        free = self.cache.max_rows - len(self.slot_req)
        if free <= 0 or not self.queue:
            return
        new = [self.queue.pop() for _ in range(min(free, len(self.queue)))]
        lo = len(self.slot_req)
        groups: dict[tuple[int, ...], list[int]] = {}
        for ri in new:
            groups.setdefault(self.requests[ri].prompt_ids, []).append(ri)
        order = [g[0] for g in groups.values()] + [ri for g in groups.values() for ri in g[1:]]
        self.slot_req.extend(order)
        u = len(groups)
        prompts = list(groups.keys())
        # prefill prompt[:-1] of each unique prompt; the last prompt token becomes the pending token
        plen = torch.tensor([len(p) - 1 for p in prompts], device=self.dev)
        if int(plen.max()) > 0:
            toks = torch.zeros(u, int(plen.max()), dtype=torch.long, device=self.dev)
            for i, p in enumerate(prompts):
                toks[i, : len(p) - 1] = torch.tensor(p[:-1])
            out = self.e.model(
                toks, start=torch.zeros(u, dtype=torch.long, device=self.dev), cache=self.cache.rows(lo, lo + u),
                hidden_layers=self.e.feature_layers if self.features is not None else (), compute_logits=False,
            )
            if self.features is not None:
                self.features[lo : lo + u, : toks.shape[1]] = out.hidden
        # copy shared prefixes to the remaining samples of each prompt
        slot_of_first = {ri: lo + i for i, ri in enumerate(order[:u])}
        for i, ri in enumerate(order[u:], start=lo + u):
            src = slot_of_first[groups[self.requests[ri].prompt_ids][0]]
            n = len(self.requests[ri].prompt_ids) - 1
            self.cache.copy_prefix(src, [i], n)
            if self.features is not None:
                self.features[i, :n] = self.features[src, :n]
        if self.e.capture is not None:
            P = int(plen.max())
            self.e.capture(Prefill(torch.tensor(order, device=self.dev),
                                   self.features[lo : lo + len(order), :P] if self.features is not None else None,
                                   torch.tensor([len(self.requests[ri].prompt_ids) - 1 for ri in order], device=self.dev)))
        for slot, ri in enumerate(order, start=lo):
            r = self.requests[ri]
            self.tokens[slot, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            self.target_len[slot] = len(r.prompt_ids) - 1
            self.draft_len[slot] = 0
            self.generated[slot] = 0
            self.budget[slot] = r.max_new_tokens
            self.keys[slot] = rng.request_key(self.e.seed, r.id, r.sample_index)
        slots = torch.arange(lo, lo + len(order), device=self.dev)
        lanes = torch.arange(3, device=self.dev)  # table row i holds lane i (LANE_SAMPLE, _DRAFT, _ACCEPT)
        positions = torch.arange(self.T, device=self.dev).repeat(3)  # (3T,) lane-major
        table = rng.uniforms(self.keys[slots], positions.expand(len(order), -1), lanes.repeat_interleave(self.T))
        self.u_table[slots] = table.view(len(order), 3, self.T)

    # ---- one decode iteration -------------------------------------------------------------------
    def step(self) -> bool:
        self.admit()
        B = len(self.slot_req)
        if B == 0:
            return False
        e, dev = self.e, self.dev
        t_round = time.perf_counter()
        L = self.target_len[:B]
        k = e.policy.choose(B, self.context()) if e.drafter is not None else 0
        # per-row draft length: leave room for the resampled/bonus token within the token budget
        remaining = self.budget[:B] - self.generated[:B]  # (B,) >= 1
        k_row = torch.clamp(remaining - 1, max=k)  # (B,)
        if k > 0:
            k = int(k_row.max())  # host sync; plain iterations skip it

        # the round's uniforms, from the table: drafts and accept tests for positions L+1..L+k, and
        # the resampled/bonus token at emitted slot j (position L+1+j)
        pos = L[:, None] + 1 + torch.arange(k + 1, device=dev)  # (B, k+1)
        rows = torch.arange(B, device=dev)[:, None]
        u_sample = self.u_table[rows, rng.LANE_SAMPLE, pos]  # (B, k+1)
        u_draft = self.u_table[rows, rng.LANE_DRAFT, pos[:, :k]]  # (B, k)
        u_accept = self.u_table[rows, rng.LANE_ACCEPT, pos[:, :k]]  # (B, k)

        t_draft = time.perf_counter()
        fallback = 0
        if k > 0:
            prop = e.drafter.propose(_ctx(self, B), k, self.sampling, u_draft)
            fallback = int((~prop.ok).sum())
            k_row = torch.where(prop.ok, k_row, torch.zeros_like(k_row))
            self.draft_len[:B] = prop.committed_len
            drafts, draft_probs = prop.tokens, prop.probs
        else:
            drafts = torch.zeros(B, 0, dtype=torch.long, device=dev)
            draft_probs = torch.zeros(B, 0, e.model.cfg.vocab_size, device=dev)
        t_verify = time.perf_counter()

        # verify: one target forward over [pending, d_1 .. d_k] at positions L .. L+k
        pending = self.tokens[torch.arange(B, device=dev), L]  # (B,)
        inp = torch.cat([pending[:, None], drafts], dim=1)  # (B, k+1)
        out = e.model(inp, start=L, cache=self.cache, hidden_layers=e.feature_layers if self.features is not None else ())
        check_finite(out.logits, "target logits")
        tr = transform(out.logits.float(), self.sampling, validate=False)
        target_probs = tr.probs  # (B, k+1, V) fp32
        if k > 0:
            verdict = verify_drafts(target_probs, draft_probs, drafts, u_accept, u_sample, draft_len=k_row)
        else:  # plain iteration: the same draw verify_drafts makes with zero drafts, minus its bookkeeping
            token = sample(target_probs[:, 0], u_sample[:, 0])  # (B,)
            zero = torch.zeros(B, dtype=torch.long, device=dev)
            verdict = Verdict(n_accepted=zero, tokens=token[:, None], n_emitted=zero + 1)
        t_done = time.perf_counter()
        self._commit(B, L, k, k_row, verdict, target_probs, tr.nucleus_size, out.hidden, fallback,
                     t_verify - t_draft, t_done - t_verify)
        self.rounds[-1].round_s = time.perf_counter() - t_round
        return True

    def context(self) -> int:
        """The longest active row's length (prompt + generated): the KV positions a forward reads.
        From the host records, so no device sync."""
        return max(len(self.requests[ri].prompt_ids) + len(self.rollouts[ri].token_ids) for ri in self.slot_req)

    def _commit(self, B, L, k, k_row, verdict, target_probs, nucleus, hidden, fallback, draft_s, verify_s) -> None:
        dev = self.dev
        slots = torch.arange(B, device=dev)
        n_acc, toks = verdict.n_accepted, verdict.tokens  # (B,), (B, k+1)
        j = torch.arange(k + 1, device=dev)
        n_emit, stopped = truncate_at_stop(toks, n_acc + 1, self.e.eos)
        lp = torch.log(target_probs.gather(-1, toks.clamp(min=0)[..., None])[..., 0])  # (B, k+1)
        # write emitted tokens at positions L+1 .. L+n_emit and the features of inputs L .. L+n_emit-1.
        # Slots past n_emit are written too (no masked write, no host sync): they lie beyond the
        # row's new length, where nothing is ever read before it is overwritten.
        pos = L[:, None] + 1 + j  # (B, k+1)
        self.tokens[slots[:, None], pos] = toks.clamp(min=0)  # -1 marks unused slots: keep ids valid
        if self.features is not None and hidden is not None:
            self.features[slots[:, None], pos - 1] = hidden
        if self.e.capture is not None:
            live = j[None, :] < n_emit[:, None]  # (B, k+1) emitted slots
            rix = torch.tensor(self.slot_req, device=dev)[:, None].expand_as(pos)[live]
            self.e.capture(Commit(rix, (L[:, None] + j)[live], hidden[live] if hidden is not None else None,
                                  target_probs[live], toks[live]))
        self.target_len[:B] = L + n_emit
        self.generated[:B] += n_emit
        done = stopped | (self.generated[:B] >= self.budget[:B])

        # host sync: copy this round's results into the Python records
        n_emit_l, toks_l, lp_l, nuc_l = n_emit.tolist(), toks.tolist(), lp.tolist(), nucleus.tolist()
        n_acc_l, k_row_l, done_l, stop_l = n_acc.tolist(), k_row.tolist(), done.tolist(), stopped.tolist()
        acc_at = [0] * k
        drf_at = [0] * k
        for b in range(B):
            r = self.rollouts[self.slot_req[b]]
            m = n_emit_l[b]
            r.token_ids.extend(toks_l[b][:m])
            r.logprobs.extend(lp_l[b][:m])
            r.nucleus_sizes.extend(nuc_l[b][:m])
            a = min(n_acc_l[b], m)
            r.round_slots.extend(range(m))
            if k == 0:
                r.sources.append(SOURCE_PLAIN)
            else:
                last = SOURCE_BONUS if n_acc_l[b] >= k_row_l[b] else SOURCE_RESAMPLED
                r.sources.extend([SOURCE_ACCEPTED] * a + ([last] if m > a else []))
            r.drafted += k_row_l[b]
            r.accepted += a
            r.rounds += 1
            for jj in range(k_row_l[b]):
                drf_at[jj] += 1
                acc_at[jj] += jj < n_acc_l[b]
            if done_l[b]:
                r.finish_reason = "stop" if stop_l[b] else "length"
        stats = RoundStats(
            active=B, k=k, drafted=sum(k_row_l), accepted=sum(min(a, m) for a, m in zip(n_acc_l, n_emit_l)),
            emitted=sum(n_emit_l), accepted_at=acc_at, drafted_at=drf_at, fallback_rows=fallback,
            drafted_per_row=k_row_l, accepted_per_row=[min(a, m) for a, m in zip(n_acc_l, n_emit_l)],
            draft_s=draft_s, verify_s=verify_s,
        )
        self.rounds.append(stats)
        self.e.policy.observe(stats)
        if any(done_l):
            self._retire([b for b in range(B) if done_l[b]])

    def _retire(self, finished: list[int]) -> None:
        """Finished rows leave: the last active rows move into their slots (one row copy each)."""
        self.finished_count += len(finished)
        n = len(self.slot_req)
        fin = set(finished)
        keep_tail = [s for s in range(n - len(finished), n) if s not in fin]
        holes = [s for s in finished if s < n - len(finished)]
        assert len(keep_tail) == len(holes)
        if holes:
            self.cache.move_rows(keep_tail, holes)
            if self.e.drafter is not None:
                self.e.drafter.move_rows(keep_tail, holes)
            src = torch.tensor(keep_tail, device=self.dev)
            dst = torch.tensor(holes, device=self.dev)
            for buf in (self.tokens, self.target_len, self.draft_len, self.generated, self.budget, self.keys, self.u_table):
                buf[dst] = buf[src]
            if self.features is not None:
                self.features[dst] = self.features[src]
            for s, d in zip(keep_tail, holes):
                self.slot_req[d] = self.slot_req[s]
        del self.slot_req[n - len(finished):]


def _ctx(state: _BatchState, B: int) -> DraftContext:
    return DraftContext(
        tokens=state.tokens, features=state.features, target_len=state.target_len[:B], draft_len=state.draft_len[:B]
    )
