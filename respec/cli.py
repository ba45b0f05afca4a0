"""The one entry point: `respec {generate,pretrain,train,distill,bench,profile,plot,compare} ...`.

Every subcommand's flags are generated from its config dataclass (config.py), so defaults live in
one place; `--config FILE.toml` supplies values, flags override them, and the resolved config is
printed at start. `main(argv)` is what tests call in-process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import config as C


class _Command:
    def __init__(self, name: str, help: str, cfg_cls: type | None, run: Callable, extra: Callable | None = None):
        self.name, self.help, self.cfg_cls, self.run, self.extra = name, help, cfg_cls, run, extra


def _run_generate(cfg: C.GenerateConfig, args: argparse.Namespace) -> int:
    from .generate import run_generate

    rep = run_generate(cfg, progress=sys.stderr.isatty())
    msg = f"wrote {rep.output}: {rep.rows} prompts, {rep.tokens} tokens in {rep.wall_s:.2f}s"
    if cfg.drafter:
        msg += f", mean acceptance length {rep.mean_accept_len:.2f}"
    print(msg)
    if rep.skipped:
        lines = ", ".join(str(n) for n, _ in rep.skipped[:20])
        print(f"skipped {len(rep.skipped)} malformed rows (lines {lines}{', ...' if len(rep.skipped) > 20 else ''})")
    return 0


_BENCHES = {
    "decode": ("plain decoding tokens/s, respec vs transformers generate", "respec.bench.decode"),
    "rollout": ("plain vs speculative rollouts on the built-in actor (batch sweep, k sweep, whole rollouts)", "respec.bench.rollout"),
    "adaptive": ("adaptive speculation vs plain vs every static k (fixed batches, whole GRPO rollouts)", "respec.bench.adaptive"),
    "grpo": ("GRPO runs with speculation on vs off over seeds: same curves, less generation time", "respec.bench.grpo"),
    "layer": ("one decoder layer's share of a plain decode step (the built-in actor's sizing rule)", "respec.bench.layer"),
    "lossless": ("the pooled losslessness test at >= 10^6 tokens over 20 seeds", "respec.bench.lossless"),
    "overlap": ("online drafter learner: frozen vs synchronous vs asynchronous step time, overlap efficiency",
                "respec.bench.overlap"),
    "stale": ("drafter staleness over one GRPO trajectory: frozen vs online variants, exact expected acceptance",
              "respec.bench.stale"),
}


def _bench_args(p: argparse.ArgumentParser) -> None:
    import importlib

    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (help_text, module) in _BENCHES.items():
        bp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_args(bp)


def _run_bench(cfg, args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(_BENCHES[args.bench][1]).run(args)


def _profile_args(p: argparse.ArgumentParser) -> None:
    from .generate import add_profile_args

    add_profile_args(p)


def _run_profile(cfg, args: argparse.Namespace) -> int:
    from .generate import run_profile_cli

    return run_profile_cli(cfg, args)


def _commands() -> list[_Command]:
    cmds = [
        _Command("generate", "plain or speculative decoding of a JSONL prompt file", C.GenerateConfig, _run_generate),
        _Command("bench", "benchmarks (results under benchmarks/results/)", None, _run_bench, _bench_args),
        _Command("profile", "re-measure the adaptive tuner's cost profile now (it is cached per device, model, dtype)",
                 None, _run_profile, _profile_args),
    ]
    try:
        from .tasks.pretrain import PretrainConfig, run_pretrain_cli

        cmds.append(_Command("pretrain", "build the built-in actor (supervised, cached)", PretrainConfig, run_pretrain_cli))
    except ImportError:
        pass
    try:
        from .drafter.distill import DistillConfig, run_distill_cli

        cmds.append(_Command("distill", "train an EAGLE-3 drafter head against an actor", DistillConfig, run_distill_cli))
    except ImportError:
        pass
    try:
        from .rl.run import add_train_args, run_train_cli

        cmds.append(_Command("train", "GRPO training of an actor on verifiable rewards (--resume RUN_DIR continues one)",
                             C.TrainConfig, run_train_cli, add_train_args))
    except ImportError:
        pass
    try:
        from .rl.plots import add_compare_args, add_plot_args, run_compare_cli, run_plot_cli

        cmds.append(_Command("plot", "PNG plots of a training run's metrics into RUN_DIR/plots/", None, run_plot_cli,
                             add_plot_args))
        cmds.append(_Command("compare", "side-by-side table and reward overlays of several training runs", None,
                             run_compare_cli, add_compare_args))
    except ImportError:
        pass
    return cmds


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _Command]]:
    parser = argparse.ArgumentParser(
        prog="respec",
        description="respec: fast RL post-training with exactly lossless, adaptive speculative rollouts",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    table = {}
    for cmd in _commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.cfg_cls is not None:
            p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file with settings")
            C.add_arguments(p, cmd.cfg_cls)
        if cmd.extra is not None:
            cmd.extra(p)
        table[cmd.name] = cmd
    return parser, table


def main(argv: Sequence[str] | None = None) -> int:
    parser, table = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    cmd = table[args.command]
    try:
        cfg = None
        if cmd.cfg_cls is not None:
            cfg = C.resolve(cmd.cfg_cls, args.config, C.overrides_from_args(args, cmd.cfg_cls))
            print(f"# respec {cmd.name}: resolved config\n" + C.to_toml(cfg), file=sys.stderr)
        return cmd.run(cfg, args)
    except (ValueError, OSError) as e:  # our errors are ValueError subclasses that name the problem
        print(f"respec {cmd.name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
