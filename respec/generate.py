"""`respec generate`: plain or speculative decoding of a JSONL prompt file with an HF checkpoint.

Library use is the same path: `load_generator(cfg)` returns the engine and tokenizer, and
`run_generate(cfg)` is what the CLI calls.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import GenerateConfig, spec_settings
from .io import DataError, atomic_write_jsonl, read_jsonl
from .models import load_pretrained, parse_dtype
from .models.transformer import Transformer
from .rollout.engine import Engine, Request, StaticK
from .rollout.sampling import SamplingParams


def load_drafter(path: str | Path, target: Transformer, actor_path: str | None = None):
    """An EAGLE head directory (config.json kind=eagle3) or a standalone draft LM checkpoint."""
    from .drafter import DraftModelDrafter, DrafterError, EagleDrafter, load_eagle

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DrafterError(f"{path}: not a drafter directory (no config.json)")
    kind = json.loads(cfg_file.read_text()).get("kind")
    if kind == "eagle3":
        return EagleDrafter(load_eagle(path, target, actor=actor_path), target)
    draft = load_pretrained(path, dtype=target.dtype, device=target.device).model
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise DrafterError(
            f"{path}: draft model vocabulary {draft.cfg.vocab_size} != actor vocabulary {target.cfg.vocab_size}"
        )
    return DraftModelDrafter(draft)


def make_policy(spec: int | str, model: Transformer, drafter, max_k: int = 8):
    """`off`/K -> a static draft length; `adaptive` -> the controller over a cached cost profile
    (measured on first use per device, model shape and dtype), choosing k in 0..max_k."""
    if spec != "adaptive":
        return StaticK(int(spec))
    if drafter is None:
        return StaticK(0)
    from .tuner import AcceptanceModel, AdaptiveK

    return AdaptiveK(cost_profile(model, drafter, max_k), acceptance=AcceptanceModel(max_k=max_k), max_k=max_k)


def cost_profile(model: Transformer, drafter, max_k: int = 8, force: bool = False):
    """The cached cost profile the adaptive tuner uses for (device, model shape, dtype, drafter
    kind); measured on first use, or now with force=True (`respec profile` re-profiles on request)."""
    from .tasks.pretrain import cache_root
    from .tuner.profile import load_or_measure

    kw = {"max_k": max_k} if max_k > 8 else {}  # the default profile covers k <= 8
    return load_or_measure(model, drafter, cache_root() / "profiles", force=force, **kw)


def run_profile_cli(cfg, args) -> int:
    """`respec profile`: re-measure the adaptive tuner's cost profile for an actor + drafter now
    (e.g. after the machine's load changed) and print it; later runs use the new one."""
    model_dir = Path(args.model) if args.model else builtin_actor_dir()
    drafter_dir = resolve_drafter(args.drafter, model_dir, builtin_actor=not args.model)
    pre = load_pretrained(model_dir, dtype=parse_dtype(args.dtype), device=args.device)
    drafter = load_drafter(drafter_dir, pre.model, actor_path=str(model_dir))
    prof = cost_profile(pre.model, drafter, args.max_k, force=True)
    print(format_profile(prof))
    return 0


def format_profile(prof) -> str:
    """Tables of a cost profile, in ms: the plain step and the speculative round at each k, at each
    profiled context (KV length)."""
    ks = range(1, prof.max_k + 1)
    lines = [f"cost profile: {prof.device}, {prof.model}, {prof.dtype} (ms)"]
    for n in prof.contexts or [prof.context]:
        lines += [f"context {n or '(not recorded)'} tokens",
                  "batch | plain | " + " | ".join(f"k={k} round" for k in ks)]
        for B in sorted(prof.verify):
            lines.append(f"{B} | {prof.plain_cost(B, n) * 1e3:.2f} | "
                         + " | ".join(f"{prof.spec_round_cost(B, k, n) * 1e3:.2f}" for k in ks))
    return "\n".join(lines)


def add_profile_args(p) -> None:
    p.add_argument("--model", default="", help="actor directory (default: the built-in actor)")
    p.add_argument("--drafter", default="", help="drafter directory (default: the built-in actor's cached drafter)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-k", type=int, default=8, help="deepest draft profiled (the tuner's speculative_num_steps)")


def _validate_row(row: dict[str, Any]) -> None:
    if "id" not in row:
        raise DataError("missing field 'id'")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DataError("'prompt_ids' must be a non-empty list of integers")
    elif "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise DataError("'prompt' must be a non-empty string")
    else:
        raise DataError("missing field 'prompt' or 'prompt_ids'")


def _builtin_rows(spec: str):
    """`builtin:N`: the first N held-out problems of the built-in arithmetic task as prompt rows."""
    from .io import JsonlRows
    from .tasks import ArithmeticTask

    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(f"input {spec!r}: expected builtin:N") from None
    return JsonlRows(rows=[(i + 1, {"id": p.id, "prompt": p.prompt}) for i, p in enumerate(ArithmeticTask().heldout(n))])


@dataclass
class GenerateReport:
    rows: int
    skipped: list[tuple[int, str]]
    tokens: int
    wall_s: float
    mean_accept_len: float
    output: Path


def run_generate(cfg: GenerateConfig, progress: bool = True) -> GenerateReport:
    cfg.validate()
    from .models.checkpoint import parse_dtype

    model_dir = cfg.model or str(builtin_actor_dir())
    pre = load_pretrained(model_dir, dtype=parse_dtype(cfg.dtype), device=cfg.device)
    model, tok = pre.model, pre.tokenizer
    data = _builtin_rows(cfg.input) if cfg.input.startswith("builtin:") else read_jsonl(cfg.input, _validate_row, cfg.on_bad_row)
    prompts: list[tuple[str, list[int]]] = []
    for lineno, row in data.rows:
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
        else:
            if tok is None:
                raise DataError(f"{cfg.input}:{lineno}: text prompt but {model_dir} has no tokenizer.json")
            ids = tok.encode_chat(row["prompt"]) if cfg.chat_template else tok.encode(row["prompt"])
        prompts.append((str(row["id"]), ids))
    spec, max_k = spec_settings(cfg.spec, cfg.speculative_num_steps, cfg.speculative_num_draft_tokens)
    drafter = None
    drafter_dir = resolve_drafter(cfg.drafter, model_dir, builtin_actor=not cfg.model, default="") or (
        _cached_builtin_drafter(model_dir) if not cfg.model and spec else "")
    if drafter_dir:
        drafter = load_drafter(drafter_dir, model, actor_path=model_dir)
    elif spec == "adaptive":
        if progress:
            print("respec generate: no drafter (--drafter DIR), so --spec adaptive decodes plainly", file=sys.stderr)
    elif spec:
        raise DataError("--spec K needs --drafter DIR")
    policy = make_policy(spec, model, drafter, max_k)
    engine = Engine(model, eos_token_ids=pre.eos_token_ids, drafter=drafter, policy=policy,
                    max_batch=cfg.max_batch, seed=cfg.seed)
    requests = [Request(pid, tuple(ids), s, cfg.max_new_tokens) for pid, ids in prompts for s in range(cfg.n)]
    sampling = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p)
    result = _generate_with_progress(engine, requests, sampling, progress)
    out_rows = []
    for r in result.rollouts:
        out_rows.append({
            "id": r.request.id, "sample": r.request.sample_index, "prompt_ids": list(r.request.prompt_ids),
            "token_ids": r.token_ids, "text": tok.decode(r.token_ids) if tok is not None else None,
            "logprobs": r.logprobs, "finish_reason": r.finish_reason,
        })
    path = atomic_write_jsonl(cfg.output, out_rows)
    return GenerateReport(len(prompts), data.skipped, result.tokens, result.wall_s, result.mean_accept_len, path)


def _generate_with_progress(engine: Engine, requests, sampling, progress: bool):
    if not progress:
        return engine.generate(requests, sampling)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[bold]generate", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("generate", total=len(requests))
        return engine.generate(requests, sampling, progress=lambda done: bar.update(task, completed=done))


def builtin_actor_dir() -> Path:
    """Where the built-in actor is cached (built by `respec pretrain` on first use)."""
    from .tasks.pretrain import ensure_builtin_actor

    return ensure_builtin_actor()


def _cached_builtin_drafter(actor_dir) -> str:
    """The built-in actor's drafter if it is already cached (`respec train` and `respec distill` build
    it); generate never spends minutes distilling one on its own."""
    from .drafter.distill import builtin_drafter_path

    d = builtin_drafter_path(actor_dir)
    return str(d) if (d / "model.safetensors").is_file() else ""


# The built-in actor's drafters, by name wherever a drafter directory is asked for (`--drafter`,
# `rollout.drafter`): its distilled EAGLE head (built on first use, ~9 minutes on 2 CPU cores) or
# the small standalone draft LM of tasks/pretrain.py (DRAFT_LM, ~1 minute). Both are cached.
BUILTIN_DRAFTERS = ("builtin:eagle", "builtin:lm")
DEFAULT_BUILTIN_DRAFTER = "builtin:eagle"


def resolve_drafter(value: str, actor_dir, builtin_actor: bool, default: str = DEFAULT_BUILTIN_DRAFTER) -> str:
    """A drafter setting -> a directory: 'builtin:eagle' / 'builtin:lm' are built (once) and cached,
    anything else is returned as given (a path); an empty setting means `default` ('' = none)."""
    value = value or default
    if value not in BUILTIN_DRAFTERS:
        return value
    if not builtin_actor:
        raise DataError(f"drafter {value!r} is the built-in actor's; with your own model pass a drafter directory")
    if value == "builtin:lm":
        from .tasks.pretrain import ensure_builtin_draft_lm

        return str(ensure_builtin_draft_lm())
    from .drafter.distill import ensure_builtin_drafter

    return str(ensure_builtin_drafter(Path(actor_dir)))
