"""Profile the costs the controller needs, on the current device, once per (device, model, dtype).

    verify[B][q]  one target forward, B rows x q query tokens, with feature capture, at the
                  reference context `ctx`; verify_by_context[n][B][q] the same at each KV length n
                  in `contexts` (attention reads the whole cache: at large batches a forward costs
                  more at longer contexts, a plain one relatively more than a verify)
    draft[B]      one drafter step for B rows (drafter forward + sampling), via its own propose()
    draft_k[B][k] a whole k-token proposal (catch-up over k + 1 committed tokens, then k steps):
                  what a round pays; k one-step figures overstate it (the catch-up is paid once).
                  The catch-up is padded to the row that committed most in the last round, and with
                  more than a few rows some row accepted everything (k + 1 tokens); profiles v4-v7
                  caught up over 2. Measured at the reference context only (a one-layer drafter's
                  attention is a small part of a round).
    round[B]      per-round sampling and accept/reject bookkeeping outside the two forwards. The
                  round's uniforms are drawn from a table made once, as the engine gathers them from
                  its per-row table (filled at admission); v4-v10 hashed them inside the timed call,
                  ~0.46 ms of a ~0.9 ms figure at one row, which the engine never pays per round
    iteration[B]  the engine's bookkeeping around every iteration, plain or speculative: its
                  policy call, uniform gathers and commit (host copies, per-row records), i.e. a
                  plain engine iteration's wall minus its forward-and-sample, paired within each
                  iteration (a difference of two separately timed calls was noise: negative at some
                  batch sizes). Both sides of the controller's comparison pay it; without it a plain
                  iteration was priced as a bare forward, 7-18% under what the engine spends at
                  1-32 rows on this CPU, which kept 16-row batches on plain decoding where k = 3
                  ran 1.09x faster (per-active-batch throughput over 9 whole rollouts, one run)
Profiles are cached as JSON under the respec cache directory (key: device name, model parameter
fingerprint shape, dtype); `force=True` re-profiles. Every configuration of a batch size is timed
round-robin (interleaved), so a burst of load hits them alike. Checkpoints store the profile a run used, so a
resumed run decides exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from ..rollout import rng
from ..rollout.drafting import DraftContext
from ..rollout.engine import Engine, Request
from ..rollout.sampling import SamplingParams, transform
from ..rollout.speculative import verify_drafts
from .controller import CostProfile

DEFAULT_GRID = (1, 2, 4, 8, 16, 32, 64)
PLAIN_ITERATIONS = 12  # decode iterations per profiled plain engine call (its median is the figure)
PROFILE_VERSION = 11  # bump when the measurement changes, so stale cached profiles are not reused
DEFAULT_CONTEXTS = (32, 128, 384)  # KV lengths the verify table is measured at (v9; v4-v8: 96 only)


def _interleaved_times(fns: dict, reps: int) -> dict:
    """Time every callable `reps` times, round-robin (one call of each per round, after one warm-up
    round), and return the lower-quartile latency of each. Interleaving puts a burst from another
    tenant into every configuration's samples alike instead of into one configuration's (which would
    skew the very ratios the controller compares); the low end of each set is the stable figure."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict = {name: [] for name in fns}
    for r in range(reps + 1):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: _low_median(ts) for name, ts in times.items()}


def _low_median(ts: list[float]) -> float:
    """The median of the lower half: the stable low end of a set of timings."""
    ts = sorted(ts)
    return statistics.median(ts[: max(1, (len(ts) + 1) // 2)])


def _running_max(table: dict, keys) -> None:
    """table[key] becomes the maximum of itself and every earlier key's value (keys in order of work)."""
    run = 0.0
    for key in keys:
        run = table[key] = max(run, table[key])


def _running_max_across(rows: dict[int, dict[int, float]]) -> None:
    """rows[key][q] becomes non-decreasing in key (keys in order of work), for every q."""
    keys = sorted(rows)
    for q in rows[keys[0]]:
        column = {key: rows[key][q] for key in keys}
        _running_max(column, keys)
        for key in keys:
            rows[key][q] = column[key]


def _monotone(profile: CostProfile) -> CostProfile:
    """Costs cannot fall as work grows: verify[B][q] and draft_k[B][k] become non-decreasing in
    q / k and in B, draft[B] in B, verify_by_context[n][B][q] also in n (running maxima), so timing
    noise cannot invent a cheap point."""
    by_context = profile.verify_by_context
    for grid in (profile.verify, profile.draft_k, *by_context.values()):
        if not grid:
            continue
        for B in grid:  # more query tokens / drafts per row cost more ...
            _running_max(grid[B], sorted(grid[B]))
        _running_max_across(grid)  # ... and so do more rows
    _running_max(profile.draft, sorted(profile.draft))
    for B in by_context[min(by_context)] if by_context else ():  # ... and longer contexts
        _running_max_across({n: table[B] for n, table in by_context.items()})
    return profile


@torch.no_grad()
def measure_profile(model, drafter, batch_sizes=DEFAULT_GRID, max_k: int = 8, ctx: int = 128,
                    contexts=DEFAULT_CONTEXTS, reps: int = 9) -> CostProfile:
    """`ctx`: the reference context of every figure; `contexts`: the KV lengths the verify table is
    also measured at (`ctx` is added to them)."""
    dev, V = model.device, model.cfg.vocab_size
    longest = model.cfg.max_position_embeddings - max(max_k + 2, PLAIN_ITERATIONS)  # what the model can hold
    ctx = min(ctx, longest)
    contexts = sorted({min(n, longest) for n in contexts} | {ctx})
    verify_by_context: dict[int, dict[int, dict[int, float]]] = {n: {} for n in contexts}
    draft: dict[int, float] = {}
    overhead: dict[int, float] = {}
    iteration: dict[int, float] = {}
    draft_k: dict[int, dict[int, float]] = {}
    layers = getattr(drafter, "feature_layers", ())
    for B in batch_sizes:
        cache = model.new_cache(B, max(contexts) + max_k + 2)
        fns = {}
        for n in contexts:
            start = torch.full((B,), n, dtype=torch.long, device=dev)
            for q in range(1, max_k + 2):
                toks = torch.randint(3, V, (B, q), device=dev)
                fns[("verify", n, q)] = lambda toks=toks, start=start: model(toks, start=start, cache=cache,
                                                                             hidden_layers=layers)
        start = torch.full((B,), ctx, dtype=torch.long, device=dev)
        if drafter is not None:
            drafter.allocate(B, ctx + max_k + 2)
            F = len(layers) * model.cfg.hidden_size
            tokens = torch.randint(3, V, (B, ctx + max_k + 2), device=dev)
            feats = torch.randn(B, ctx + max_k + 2, F, dtype=model.dtype, device=dev) if layers else None
            L = torch.full((B,), ctx, dtype=torch.long, device=dev)
            ctx_obj = DraftContext(tokens=tokens, features=feats, target_len=L, draft_len=L - 1)
            u = torch.rand(B, max_k, dtype=torch.float64, device=dev)
            fns[("draft", 0)] = lambda ctx_obj=ctx_obj, u=u: drafter.propose(ctx_obj, 1, SamplingParams(1.0), u[:, :1])
            # whole k-token proposals, catching up over the k + 1 tokens a full round commits first
            for kk in range(1, max_k + 1):
                ctx_k = DraftContext(tokens=tokens, features=feats, target_len=L, draft_len=L - (kk + 1))
                fns[("draft", kk)] = lambda kk=kk, ctx_k=ctx_k, u=u: drafter.propose(ctx_k, kk, SamplingParams(1.0), u[:, :kk])
        k = 4
        logits = torch.randn(B, k + 1, V, device=dev)
        dprobs = torch.softmax(torch.randn(B, k, V, device=dev), -1)
        dtoks = torch.randint(0, V, (B, k), device=dev)
        keys = torch.arange(B, device=dev)

        u_round = rng.uniforms(keys, start[:, None] + torch.arange(3 * k + 1, device=dev), 0)

        def round_overhead(logits=logits, dprobs=dprobs, dtoks=dtoks, u=u_round):
            tp = transform(logits, SamplingParams(1.0), validate=False).probs
            v = verify_drafts(tp, dprobs, dtoks, u[:, :k], u[:, k : 2 * k + 1])
            v.n_emitted.tolist()

        fns[("round", 0)] = round_overhead
        # the engine's whole plain iteration (with feature capture, as in adaptive plain iterations)
        engine = Engine(model, eos_token_ids=[], max_batch=B, feature_layers=layers)
        g = torch.Generator().manual_seed(B)
        reqs = [Request(f"profile-{i}", tuple(torch.randint(3, V, (ctx,), generator=g).tolist()), 0, PLAIN_ITERATIONS)
                for i in range(B)]
        plain_iters: list[float] = []

        def plain_iteration(engine=engine, reqs=reqs, out=plain_iters):
            res = engine.generate(reqs, SamplingParams(1.0))
            out.append(statistics.median(r.round_s - r.verify_s for r in res.rounds))  # paired, per iteration
        fns[("plain", 0)] = plain_iteration
        t = _interleaved_times(fns, reps)
        for n in contexts:
            verify_by_context[n][B] = {q: t[("verify", n, q)] for q in range(1, max_k + 2)}
        if drafter is not None:
            draft[B] = t[("draft", 0)]
            draft_k[B] = {kk: t[("draft", kk)] for kk in range(1, max_k + 1)}
        overhead[B] = t[("round", 0)]
        iteration[B] = _low_median(plain_iters[1:])  # [0] is the warm-up round
    return _monotone(CostProfile(list(batch_sizes), verify_by_context[ctx], draft or {B: 0.0 for B in batch_sizes},
                                 overhead, draft_k, iteration_overhead=iteration, context=ctx,
                                 verify_by_context=verify_by_context if len(contexts) > 1 else {},
                                 device=_device_name(dev), model=_fingerprint(model), dtype=str(model.dtype).replace("torch.", "")))


def _device_name(dev) -> str:
    if str(dev).startswith("cuda"):
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()}"


def _fingerprint(model) -> str:
    c = model.cfg
    return f"{c.arch}-h{c.hidden_size}-l{c.num_layers}-v{c.vocab_size}-i{c.intermediate_size}"


def _drafter_fingerprint(drafter) -> str:
    """What a drafter step's cost depends on: its kind and its shape (a standalone draft LM's size,
    an EAGLE head's widths), so two drafters of one class never share a profile."""
    if drafter is None:
        return "none"
    shape = ""
    if getattr(drafter, "model", None) is not None:  # DraftModelDrafter
        shape = _fingerprint(drafter.model)
    elif getattr(drafter, "head", None) is not None:  # EagleDrafter
        c = drafter.head.cfg
        shape = f"h{c.hidden_size}-i{c.intermediate_size}-f{len(c.feature_layers)}-v{c.vocab_size}"
    return f"{type(drafter).__name__}:{shape}"


def load_or_measure(model, drafter, cache_dir: Path, force: bool = False, **kw) -> CostProfile:
    from ..models.linear import kernel_tag

    key = hashlib.sha256(json.dumps([PROFILE_VERSION, _device_name(model.device), _fingerprint(model), str(model.dtype),
                                     kernel_tag(model.device), _drafter_fingerprint(drafter),
                                     sorted(kw.items())]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"profile-{key}.json"
    if path.is_file() and not force:
        return CostProfile.from_dict(json.loads(path.read_text()))
    prof = measure_profile(model, drafter, **kw)
    from ..io import atomic_write_text

    atomic_write_text(path, json.dumps(prof.to_dict(), indent=1))
    return prof
