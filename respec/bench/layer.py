"""What one decoder layer costs as a share of a whole plain decode step (the built-in actor's sizing rule).

Speculation pays on a CPU only if a drafter step (about one decoder layer) is much cheaper than a
target step; the task issue sizes the built-in actor so that one layer costs at most ~15% of a full
decode step. Measured directly, with the engine: the actor, and a copy with its last layer removed,
decode the same prompts at a fixed active batch (stop tokens ignored), interleaved, 5+ repetitions.

    step(L)     = wall seconds per decode iteration with L layers (B rows, one token each)
    layer share = (step(L) - step(L - 1)) / step(L)

The difference is the marginal cost of a layer: embedding, final norm, LM head, sampling and the
engine's bookkeeping are in both and cancel. Bootstrap 95% interval over repetitions (of the ratio
step(L - 1) / step(L), mapped through 1 - x).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path

import torch

from ..models import load_pretrained
from ..rollout.engine import Engine, Request
from ..rollout.sampling import SamplingParams
from .protocol import device_info, interleaved, ratio_ci, report_header, write_results

GOAL_SHARE = 0.15


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="checkpoint dir (default: the built-in actor)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/layer-share")


def without_last_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with its last decoder layer removed (the same weights otherwise)."""
    short = copy.deepcopy(model)
    short.layers = short.layers[:-1]
    short.cfg = dataclasses.replace(short.cfg, num_layers=len(short.layers))
    return short


def measure(model, batches: list[int], new_tokens: int, prompt_len: int, reps: int) -> list[dict]:
    short = without_last_layer(model)
    V = model.cfg.vocab_size
    records = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, V, (B, prompt_len), generator=g)
        reqs = [Request(str(i), tuple(prompts[i].tolist()), 0, new_tokens) for i in range(B)]
        engines = {"full": Engine(model, eos_token_ids=[], max_batch=B), "short": Engine(short, eos_token_ids=[], max_batch=B)}

        def step_s(name: str):
            def go() -> float:
                res = engines[name].generate(reqs, SamplingParams(1.0))
                return statistics.median(r.round_s for r in res.rounds)  # one decode iteration
            return go

        t = interleaved({name: step_s(name) for name in engines}, reps=reps)
        r = ratio_ci(t["short"], t["full"])  # share = 1 - short / full
        share = {"median": round(1 - r.median, 4), "ci95": [round(1 - r.hi, 4), round(1 - r.lo, 4)]}
        rec = {"batch_size": B, "layers": model.cfg.num_layers, "step_ms": round(1e3 * statistics.median(t["full"]), 3),
               "step_ms_one_layer_less": round(1e3 * statistics.median(t["short"]), 3), "layer_share": share,
               "goal_le_0_15": share["median"] <= GOAL_SHARE, "reps": reps}
        records.append(rec)
        print(f"B={B:3d}: step {rec['step_ms']:.2f} ms, one layer less {rec['step_ms_one_layer_less']:.2f} ms, "
              f"layer share {share['median']:.3f} [{share['ci95'][0]:.3f}, {share['ci95'][1]:.3f}]", flush=True)
    return records


def render(payload: dict) -> str:
    info = payload["info"]
    lines = report_header("One decoder layer as a share of a plain decode step", info) + [
             "Engine plain decoding at a fixed active batch (stops ignored), the actor vs a copy without its last "
             "layer, interleaved; share = (step(L) - step(L-1)) / step(L), median over repetitions with a "
             f"bootstrap 95% interval. Goal: at most {GOAL_SHARE:.2f}.\n",
             "| batch | layers | step ms | one layer less, ms | layer share (95% CI) | goal met |", "|---|---|---|---|---|---|"]
    for r in payload["records"]:
        s = r["layer_share"]
        lines.append(f"| {r['batch_size']} | {r['layers']} | {r['step_ms']:.2f} | {r['step_ms_one_layer_less']:.2f} | "
                     f"{s['median']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {r['goal_le_0_15']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from ..generate import builtin_actor_dir

    model_dir = Path(args.model) if args.model else builtin_actor_dir()
    model = load_pretrained(model_dir).model
    records = measure(model, [int(b) for b in args.batches.split(",")], args.new_tokens, args.prompt_len, args.reps)
    payload = {"info": device_info(), "model": str(model_dir), "new_tokens": args.new_tokens, "records": records}
    md = render(payload)
    write_results(Path(args.out), payload, md)
    print(md)
    return 0
