"""`respec distill`: train an EAGLE-3 drafter head against a frozen actor (offline distillation).

What it learns from: the actor's *own* samples. `collect_samples` decodes prompts with the rollout
engine (plain decoding, temperature 1), `teacher_force` runs ONE actor forward per batch over those
sequences and returns what the head needs: the chosen layers' features and the actor's log-softmax
at temperature 1 at every position. The drafter is judged by how often the actor accepts its
drafts on the actor's own outputs, so that is the distribution it should be trained on; teacher
text (the task's written-out solutions) would be off-policy.

The loss (`distill_loss`) is a soft cross-entropy, i.e. forward KL(actor || drafter) up to the
actor's entropy, over the EAGLE training-time-test unroll (`EagleHead.train_forward`): step s
reproduces draft step s of a speculative round, feeding back the head's own features. Why soft
targets and not the sampled token: the acceptance probability of a draft at temperature 1 is
alpha = sum_v min(p_actor(v), p_draft(v)) (= 1 - total variation), which is maximised by matching
the whole distribution, and the full distribution is a far lower-variance signal than one sample.

The per-sample `sample_weight` is the hook the online learner uses (staleness / importance
weights): the loss is a weighted mean over tokens, so a zero weight removes a sample entirely.

Data refresh (`DistillConfig.refresh`): every `refresh` steps a new pool is sampled (new prompts
from the task stream or the next slice of the data file, new seed); 0 keeps one fixed pool. The
actor is frozen, so a pool never goes stale; what matters is how often each sequence is revisited,
since a one-layer head overfits a small pool seen many times. Sampling costs the same per sequence
up front or in slices, so it is done in slices: training starts after the first one, and the data
seen grows with max_steps without resizing anything. With the defaults each pool (64 prompts x 4
samples) is seen ~3 times (50 steps x 16 / 256) and a run samples 16 pools, 4,096 sequences.

Default budget (the built-in actor, hidden 256, 6 layers, vocabulary 29, on 2 CPU cores): each
pool is sampled at up to 256 rows per engine batch (3.2 s per pool, against 4.8 s at 64 rows) and
teacher-forced once into a `TeacherPool` (forwarding every batch anew cost a third of each step,
0.10 of 0.30 s); batches are length-bucketed (a step pads to ~116 tokens, mean sequence ~98). Whole
default run, measured alone (`respec distill --output DIR`): 800 steps in 230 s, 3 min 56 s wall
(was 315 s of training before the pool cache); held-out acceptance length on 128 prompts at k=4,
temperature 1 (two measurement seeds): 3.01 and 3.01, against 3.08 and 3.00 for the build before.

Session 11 found 800 steps too few: the same recipe at 1600 steps (482 s of training on 2 cores,
~9 minutes wall with sampling) lifts the held-out acceptance length at k=4 from 3.35 to 3.74 (on
the 16 check prompts; training-batch alpha ~0.94 per draft position against ~0.80), and the
rollout engine's batch-1 speedup at k=4 from 1.47x to 1.97x in one interleaved run. 1600 is the
default; the built-in drafter's cache name carries BUILTIN_DRAFTER_BUILD, so older caches rebuild.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..config import ConfigValueError, _help
from ..models.transformer import Transformer
from ..rollout.sampling import SamplingParams
from ..rollout.speculative import acceptance_rate
from .eagle import EagleConfig, EagleDrafter, EagleHead, save_eagle

DEFAULT_STEP_DECAY = 0.8  # weight of unroll step s is DEFAULT_STEP_DECAY ** (s - 1) (EAGLE-3 style)


# ---- loss ----------------------------------------------------------------------------------------
@dataclass
class TopKTarget:
    """A target distribution kept sparsely: its k most likely tokens plus one "other" bucket.

    What the online replay buffer stores instead of (T, V) probabilities (replay.py). The loss
    against it is the forward KL over the partition {top-k tokens} + {everything else}:
        sum_{v in K} p(v) log(p(v) / q(v)) + p_other log(p_other / q_other),
    with q_other = 1 - sum_{v in K} q(v) taken as a log-sum-exp of the drafter's remaining log-probs.
    With k = V it is the full KL (p_other = 0).
    """

    ids: Tensor  # (B, T, k) long: the target's k most likely next tokens
    logprobs: Tensor  # (B, T, k) float32: their log-probs (-inf where the target gives 0)
    other_logmass: Tensor  # (B, T) float32: log of the remaining mass (-inf when the top k hold it all)


def _topk_terms(draft_lp: Tensor, target: TopKTarget) -> tuple[Tensor, Tensor, Tensor]:
    """Soft cross-entropy, acceptance and top-1 agreement against a top-k target: 3 x (B, n).

    draft_lp (B, n, V); target already shifted to the n entries. alpha here is
    sum_{v in K} min(p, q) + min(p_other, q_other): an upper bound on the true sum_v min(p, q)
    (the bucket merges the tail), exact when k = V.
    """
    p_k = target.logprobs.float().exp()  # (B, n, k)
    p_o = target.other_logmass.float().exp()  # (B, n)
    lq_k = draft_lp.gather(-1, target.ids)  # (B, n, k)
    in_k = torch.zeros_like(draft_lp, dtype=torch.bool).scatter_(-1, target.ids, True)  # (B, n, V)
    # log q_other: log-sum-exp over the tokens outside K. Rows where K is the whole vocabulary get a
    # finite dummy (their p_other is 0): an all -inf log-sum-exp would send NaN through backward.
    rest = draft_lp.masked_fill(in_k, float("-inf"))
    rest = torch.where(in_k.all(-1, keepdim=True), torch.zeros_like(rest), rest)
    lq_o = rest.logsumexp(-1)  # (B, n)
    ce = -(p_k * lq_k).sum(-1) - torch.where(p_o > 0, p_o * lq_o, torch.zeros_like(p_o))
    with torch.no_grad():
        alpha = torch.minimum(p_k, lq_k.exp()).sum(-1) + torch.where(p_o > 0, torch.minimum(p_o, lq_o.exp()), 0.0)
        top1 = (draft_lp.argmax(-1) == target.ids[..., 0]).float()
    return ce, alpha, top1


def distill_loss(
    head: EagleHead,
    target: Transformer,
    tokens: Tensor,
    target_feats: Tensor,
    target_logprobs: Tensor | TopKTarget,
    loss_mask: Tensor,
    depth: int,
    sample_weight: Tensor | None = None,
    step_decay: float = DEFAULT_STEP_DECAY,
    temperature: float = 1.0,
) -> tuple[Tensor, dict]:
    """Soft cross-entropy of the drafter against the actor, over `depth` unroll steps.

    tokens (B, T) long; target_feats (B, T, F); target_logprobs (B, T, V): the actor's log-probs,
    position t giving the law of token t+1 (offline: log-softmax at temperature 1), or a TopKTarget
    of the same layout (online: top-k + "other" bucket); loss_mask (B, T) bool: positions whose
    next-token law is learned (response positions); sample_weight (B,) or None (all ones);
    temperature: the drafter's logits are divided by it, so a target recorded at rollout
    temperature T is matched by the distribution the engine drafts from at T.

    Entry i of the head pairs feature i with token i+1 and predicts token i+2, whose law is
    target_logprobs[:, i+1]; at step s only entries i >= s-1 exist (an earlier entry has no round
    that could draft it). Per step: weighted mean over the valid entries of
    -sum_v p_actor(v) log q_draft(v), weights sample_weight[b]. Total: sum_s step_decay**(s-1) * step.
    (Forward KL(actor || drafter) up to the actor's entropy, which does not depend on the drafter.)

    stats (detached floats): loss, and per step (lists, step 1 first) ce, top1 (draft argmax ==
    actor argmax) and alpha (expected acceptance sum_v min(p, q) at the given temperature; an upper
    bound with a TopKTarget, see _topk_terms), plus tokens (valid step-1 entries).
    """
    B, T = tokens.shape
    n = T - 1
    outs = head.train_forward(target, tokens, target_feats, depth)  # depth x (B, n, V)
    if isinstance(target_logprobs, TopKTarget):
        sparse = TopKTarget(target_logprobs.ids[:, 1:], target_logprobs.logprobs[:, 1:],
                            target_logprobs.other_logmass[:, 1:])  # entry i -> the law of token i+2
    else:
        actor_lp = target_logprobs[:, 1:].float()  # (B, n, V): the law of token i+2 for entry i
        actor_p = actor_lp.exp()
    weight = torch.ones(B, device=tokens.device) if sample_weight is None else sample_weight.float()
    entry = torch.arange(n, device=tokens.device)
    loss = torch.zeros((), device=tokens.device)
    stats: dict = {"ce": [], "top1": [], "alpha": []}
    for s, logits in enumerate(outs, start=1):
        valid = loss_mask[:, 1:] & (entry >= s - 1)[None, :]  # (B, n)
        w = weight[:, None] * valid  # (B, n)
        denom = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
        draft_lp = (logits.float() / temperature).log_softmax(-1)  # (B, n, V)
        if isinstance(target_logprobs, TopKTarget):
            ce, alpha, top1 = _topk_terms(draft_lp, sparse)  # (B, n) each
        else:
            ce = -(actor_p * draft_lp).sum(-1)  # (B, n)
            with torch.no_grad():
                top1 = (draft_lp.argmax(-1) == actor_lp.argmax(-1)).float()  # (B, n)
                alpha = acceptance_rate(actor_p, draft_lp.exp()).float()  # (B, n)
        step_loss = torch.where(valid, ce * w, torch.zeros_like(ce)).sum() / denom
        loss = loss + step_decay ** (s - 1) * step_loss
        with torch.no_grad():
            stats["ce"].append(float(step_loss))
            stats["top1"].append(float((top1 * w).sum() / denom))
            stats["alpha"].append(float((alpha * w).sum() / denom))
            if s == 1:
                stats["tokens"] = int(valid.sum())
    stats["loss"] = float(loss.detach())
    return loss, stats


# ---- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    tokens: tuple[int, ...]  # prompt + sampled response (ending with the stop token if one ended it)
    prompt_len: int


@dataclass
class TeacherBatch:
    """One right-padded batch with the actor's view of it (no gradients)."""

    tokens: Tensor  # (B, T) long, padded with pad_id after each row
    features: Tensor  # (B, T, F) chosen target layers' outputs, concatenated
    logprobs: Tensor  # (B, T, V) float32 log-softmax at temperature 1: position t -> token t+1
    loss_mask: Tensor  # (B, T) bool: positions whose next token is a response token
    lengths: Tensor  # (B,) long: valid tokens per row


@torch.no_grad()
def collect_samples(
    actor: Transformer,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    n_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    max_batch: int = 64,
) -> list[Sample]:
    """The actor's own responses: plain engine decoding at temperature 1, n_per_prompt per prompt.

    Stop tokens: the actor config's eos ids plus the tokenizer's (if any). Randomness is keyed by
    (seed, prompt index, sample index), so the same call gives the same samples.
    """
    from ..rollout.engine import Engine

    eos = set(actor.cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = Engine(actor, eos_token_ids=sorted(eos), max_batch=max_batch, seed=seed)
    requests = engine.make_requests([(i, p) for i, p in enumerate(prompts)], n=n_per_prompt,
                                    max_new_tokens=max_new_tokens)
    result = engine.generate(requests, SamplingParams(temperature=1.0))
    return [Sample(r.request.prompt_ids + tuple(r.token_ids), len(r.request.prompt_ids)) for r in result.rollouts]


def _padded(sequences: Sequence[Sample], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded tokens (B, T), the loss mask (B, T) of positions that predict a response token
    (or eos), and the lengths (B,): the layout of every TeacherBatch."""
    B, T = len(sequences), max(len(s.tokens) for s in sequences)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(sequences):
        tokens[b, : len(s.tokens)] = torch.tensor(s.tokens)
        loss_mask[b, s.prompt_len - 1 : len(s.tokens) - 1] = True
    lengths = torch.tensor([len(s.tokens) for s in sequences])
    return tokens.to(device), loss_mask.to(device), lengths.to(device)


@torch.no_grad()
def teacher_force(
    actor: Transformer, sequences: Sequence[Sample], feature_layers: Sequence[int], pad_id: int = 0
) -> TeacherBatch:
    """Pad `sequences` and run ONE actor forward over them for features and log-probs."""
    tokens, loss_mask, lengths = _padded(sequences, pad_id, actor.device)
    out = actor(tokens, hidden_layers=tuple(feature_layers))  # right padding: the causal mask hides it
    # temperature 1 without truncation: what sampling.transform gives at SamplingParams(1.0), in log space
    logprobs = out.logits.float().log_softmax(-1)  # (B, T, V)
    return TeacherBatch(tokens, out.hidden, logprobs, loss_mask, lengths)


class TeacherPool:
    """A sample pool teacher-forced once: each sequence's features and log-probs, kept per sequence.

    A pool is revisited ~3 times over its `refresh` window; forwarding each batch anew cost a third
    of a distillation step. Here every sequence is forwarded once, in length-sorted chunks (little
    padding), and `batch(indices)` pads the stored rows into a TeacherBatch. Values equal a
    per-batch `teacher_force` up to floating-point summation order (causal, right-padded: the padding
    never reaches a valid position).
    """

    def __init__(self, actor: Transformer, pool: Sequence[Sample], feature_layers: Sequence[int],
                 pad_id: int = 0, chunk: int = 32) -> None:
        self.samples = list(pool)
        self.pad_id = pad_id
        self.features: list[Tensor] = [None] * len(pool)  # type: ignore[list-item]  # (L_i, F)
        self.logprobs: list[Tensor] = [None] * len(pool)  # type: ignore[list-item]  # (L_i, V)
        order = sorted(range(len(pool)), key=lambda i: len(pool[i].tokens))
        for c in range(0, len(order), chunk):
            idx = order[c : c + chunk]
            tb = teacher_force(actor, [pool[i] for i in idx], feature_layers, pad_id=pad_id)
            for row, i in enumerate(idx):
                n = len(pool[i].tokens)
                self.features[i] = tb.features[row, :n].clone()
                self.logprobs[i] = tb.logprobs[row, :n].clone()

    def batch(self, indices: Sequence[int]) -> TeacherBatch:
        f0, l0 = self.features[indices[0]], self.logprobs[indices[0]]
        tokens, loss_mask, lengths = _padded([self.samples[i] for i in indices], self.pad_id, f0.device)
        B, T = tokens.shape
        feats = f0.new_zeros(B, T, f0.shape[-1])
        logprobs = l0.new_zeros(B, T, l0.shape[-1])
        for b, i in enumerate(indices):
            n = len(self.samples[i].tokens)
            feats[b, :n] = self.features[i]
            logprobs[b, :n] = self.logprobs[i]
        return TeacherBatch(tokens, feats, logprobs, loss_mask, lengths)


@torch.no_grad()
def measure_acceptance(
    actor: Transformer, head: EagleHead, prompts: Sequence[Sequence[int]], eos_token_ids: Sequence[int],
    max_new_tokens: int, seed: int, k: int = 4,
) -> float:
    """Measured mean acceptance length tau (tokens per verify pass) of the head on `prompts`:
    engine speculative decoding, static k, temperature 1."""
    from ..rollout.engine import Engine, StaticK

    was_training = head.training
    head.eval()
    engine = Engine(actor, eos_token_ids=eos_token_ids, drafter=EagleDrafter(head, actor), policy=StaticK(k),
                    max_batch=64, seed=seed)
    requests = engine.make_requests([(i, p) for i, p in enumerate(prompts)], n=1, max_new_tokens=max_new_tokens)
    tau = engine.generate(requests, SamplingParams(temperature=1.0)).mean_accept_len
    head.train(was_training)
    return tau


# ---- the command ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillConfig:
    model: str = _help("actor checkpoint directory the drafter is trained against; empty = the built-in actor", "")
    data: str = _help("JSONL of prompts (rows with 'prompt' or 'prompt_ids'); empty = the built-in task's prompts", "")
    output: str = _help("drafter directory to write (config.json + model.safetensors)", "")
    max_steps: int = _help("optimizer steps", 1600)
    batch_size: int = _help("sequences per step", 16)
    lr: float = _help("peak AdamW learning rate (linear warm-up, cosine decay to a tenth)", 3e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    depth: int = _help("training-time-test unroll steps (draft steps learned)", 3)
    step_decay: float = _help("loss weight of unroll step s is step_decay**(s-1)", DEFAULT_STEP_DECAY)
    num_prompts: int = _help("prompts per sample pool", 64)
    samples_per_prompt: int = _help("actor samples per prompt (temperature 1)", 4)
    refresh: int = _help("draw a fresh pool (new prompts, new samples) every N steps; 0 = one fixed pool", 50)
    max_new_tokens: int = _help("generation budget per sample (pools and held-out measurement)", 320)
    eval_prompts: int = _help("held-out prompts for measured acceptance before/after (0 = skip)", 16)
    seed: int = _help("head initialisation, sampling and batch-order seed", 0)
    head_intermediate_size: int = _help("MLP width of the head; 0 = the actor's", 0)
    bf16_autocast: bool = _help("bf16 autocast for the head's training forward (weights, optimizer and loss stay "
                                "fp32); on 2 CPU cores a step of the built-in head takes ~0.15 s instead of ~0.23 s",
                                True)

    def validate(self) -> None:
        if not self.output:
            raise ConfigValueError("output is required (--output DRAFTER_DIR)")
        for key in ("max_steps", "batch_size", "depth", "num_prompts", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("refresh", "eval_prompts"):
            if getattr(self, key) < 0:
                raise ConfigValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (0 < self.step_decay <= 1):
            raise ConfigValueError(f"step_decay must be in (0, 1], got {self.step_decay}")


@dataclass
class DistillReport:
    output: Path
    actor: Path
    steps: int
    tau_before: float | None  # measured mean acceptance length on held-out prompts (k=4, temperature 1)
    tau_after: float | None
    final: dict  # distill_loss stats of the last step
    train_s: float
    wall_s: float


class _Prompts:
    """Training prompts (token ids) served in consecutive slices, and the held-out ones."""

    def __init__(self, cfg: DistillConfig, tokenizer) -> None:
        self._cursor = 0
        if not cfg.data:
            from ..tasks.arithmetic import ArithmeticTask

            if tokenizer is None:
                raise ConfigValueError("the built-in task's prompts need the actor's tokenizer.json")
            self._task = ArithmeticTask()
            self._tok = tokenizer
            self._rows = None
            self.heldout = [tokenizer.encode(p.prompt) for p in self._task.heldout(cfg.eval_prompts)]
            return
        from ..io import DataError, read_jsonl

        def check(row: dict) -> None:
            ids = row.get("prompt_ids")
            if ids is not None:
                ints = isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
                if not ints or not ids:
                    raise DataError("'prompt_ids' must be a non-empty list of integers")
            elif not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise DataError("missing field 'prompt' (non-empty string) or 'prompt_ids'")
            elif tokenizer is None:
                raise DataError("text prompt but the actor has no tokenizer.json")

        rows = [r for _, r in read_jsonl(cfg.data, check).rows]
        ids = [r["prompt_ids"] if "prompt_ids" in r else tokenizer.encode(r["prompt"]) for r in rows]
        if len(ids) <= cfg.eval_prompts:
            raise DataError(f"{cfg.data}: {len(ids)} prompts, need more than eval_prompts={cfg.eval_prompts} "
                            f"(the last eval_prompts rows are held out)")
        cut = len(ids) - cfg.eval_prompts
        self._rows, self.heldout = ids[:cut], ids[cut:]

    def next(self, count: int) -> list[list[int]]:
        start, self._cursor = self._cursor, self._cursor + count
        if self._rows is None:
            return [self._tok.encode(p.prompt) for p in self._task.problems(start, count)]
        return [self._rows[(start + i) % len(self._rows)] for i in range(count)]


def _length_bucketed(pool: Sequence[Sample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (index lists): shuffle, sort windows of 8 batches by length, cut, shuffle.

    Rows of similar length share a batch, so little compute goes to padding (the head's attention
    in the unroll is quadratic in the padded length), while batch order stays random.
    """
    idx = list(range(len(pool)))
    rng.shuffle(idx)
    window = 8 * batch_size
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: len(pool[i].tokens))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _lr_at(step: int, cfg: DistillConfig) -> float:
    warmup = max(1, cfg.max_steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_distill(cfg: DistillConfig, progress: bool = True) -> DistillReport:
    """Distil a fresh EAGLE head against the actor and save it to cfg.output (atomically)."""
    from ..models import load_pretrained
    from ..report.progress import ProgressBar

    cfg.validate()
    t0 = time.perf_counter()
    if cfg.model:
        actor_dir = Path(cfg.model)
    else:
        from ..tasks.pretrain import ensure_builtin_actor

        actor_dir = ensure_builtin_actor()
    pre = load_pretrained(actor_dir, dtype=torch.float32)
    actor, tok = pre.model, pre.tokenizer
    actor.requires_grad_(False)  # frozen: only the head trains (its shared embed/LM head are read detached)
    eos = sorted(set(pre.eos_token_ids))
    pad_id = actor.cfg.pad_token_id if actor.cfg.pad_token_id is not None else 0
    prompts = _Prompts(cfg, tok)

    gen = torch.Generator().manual_seed(cfg.seed)
    head = EagleHead(EagleConfig.for_target(actor.cfg, actor=str(actor_dir.resolve()),
                                            intermediate_size=cfg.head_intermediate_size)).init_weights(gen)
    head.to(actor.device)

    def tau() -> float | None:
        if not prompts.heldout:
            return None
        return measure_acceptance(actor, head, prompts.heldout, eos, cfg.max_new_tokens, seed=cfg.seed + 1)

    tau_before = tau()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    order = random.Random(cfg.seed)
    bar = ProgressBar(cfg.max_steps, "distill", progress)
    pool: list[Sample] = []
    teacher: TeacherPool | None = None
    queue: list[list[int]] = []
    stats: dict = {}
    ema = None
    t_train = time.perf_counter()
    head.train()
    for step in range(cfg.max_steps):
        if step == 0 or (cfg.refresh and step % cfg.refresh == 0):
            pool = collect_samples(actor, tok, prompts.next(cfg.num_prompts), cfg.samples_per_prompt,
                                   cfg.max_new_tokens, seed=cfg.seed + 1000 + step, max_batch=256)
            teacher = TeacherPool(actor, pool, head.cfg.feature_layers, pad_id=pad_id)
            queue = []
        if not queue:  # a new epoch over the pool
            queue = _length_bucketed(pool, cfg.batch_size, order)
        tb = teacher.batch(queue.pop())
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with torch.autocast(actor.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss, stats = distill_loss(head, actor, tb.tokens, tb.features, tb.logprobs, tb.loss_mask, cfg.depth,
                                       step_decay=cfg.step_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        a = stats["alpha"][0]
        ema = a if ema is None else 0.9 * ema + 0.1 * a
        bar.update(step + 1, f"loss {stats['loss']:.3f} alpha1 {ema:.3f}")
    bar.close()
    train_s = time.perf_counter() - t_train
    head.eval()
    tau_after = tau()
    report = DistillReport(
        output=Path(cfg.output), actor=actor_dir, steps=cfg.max_steps, tau_before=tau_before, tau_after=tau_after,
        final=stats, train_s=train_s, wall_s=time.perf_counter() - t0,
    )
    meta = {"config": asdict(cfg), "actor": str(actor_dir.resolve()), "steps": cfg.max_steps,
            "tau_before": tau_before, "tau_after": tau_after, "final": stats, "train_seconds": round(train_s, 1)}
    save_eagle(head, cfg.output, extra_files={"respec_distill.json": json.dumps(meta, indent=2)})
    return report


def run_distill_cli(cfg: DistillConfig, args) -> int:
    rep = run_distill(cfg, progress=True)  # a bar on a terminal, else a line every 10% of the steps
    final = rep.final
    alphas = ", ".join(f"{a:.3f}" for a in final.get("alpha", []))
    print(f"wrote {rep.output} (EAGLE head for actor {rep.actor}): {rep.steps} steps in {rep.train_s:.1f}s; "
          f"last batch alpha per step [{alphas}]")
    if rep.tau_before is not None:
        print(f"held-out mean acceptance length (k=4, temperature 1): {rep.tau_before:.3f} -> {rep.tau_after:.3f}")
    return 0


# Bump when the default distillation recipe changes what the built-in drafter is (2: 1600 steps).
BUILTIN_DRAFTER_BUILD = 2


def builtin_drafter_path(actor_dir) -> Path:
    """Where the built-in drafter of an actor directory is cached (it may not exist yet)."""
    from ..tasks.pretrain import cache_root

    return cache_root() / f"drafter-{Path(actor_dir).resolve().name}-b{BUILTIN_DRAFTER_BUILD}"


def ensure_builtin_drafter(actor_dir: Path, progress: bool | None = None) -> Path:
    """The cached drafter of an actor directory (distilled with the defaults on first use).

    Cached next to the actor in the shared cache, keyed by the actor's directory name, so every
    command (train, bench, generate) reuses one drafter per built-in actor.
    """
    out = builtin_drafter_path(actor_dir)
    if (out / "model.safetensors").is_file():
        return out
    print(f"distilling the drafter for {actor_dir} into {out} (once; cached for later commands)", file=sys.stderr)
    rep = run_distill(DistillConfig(model=str(actor_dir), output=str(out)),
                      progress=sys.stderr.isatty() if progress is None else progress)
    print(f"drafter ready: held-out mean acceptance length {rep.tau_before} -> {rep.tau_after}", file=sys.stderr)
    return out
