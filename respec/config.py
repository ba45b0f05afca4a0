"""Configs: frozen dataclasses are the single source of every default and its help text.

The CLI flags and the TOML file format are generated from / validated against these classes:
`--section.key value` on the command line and `[section] key = value` in a TOML file address the
same field. Precedence: dataclass default < TOML file (--config) < command-line flag. Unknown keys
and ill-typed values are errors naming the key. The resolved config is printed at start and saved
next to the outputs (`to_toml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any


class ConfigValueError(ValueError):
    """An invalid config value or key; the message names the key."""


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


def _section(cls: type, text: str) -> Any:
    return field(default_factory=cls, metadata={"help": text})


# ---- generation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateConfig:
    model: str = _help("HF-format checkpoint directory (Llama / Qwen2 / Qwen3); empty = the built-in actor", "")
    input: str = _help("JSONL of {id, prompt} or {id, prompt_ids} rows, or builtin:N (N held-out task problems)", "")
    output: str = _help("JSONL written atomically: id, sample, prompt_ids, token_ids, text, logprobs, finish_reason", "")
    n: int = _help("samples per prompt", 1)
    max_new_tokens: int = _help("generation budget per sample", 128)
    seed: int = _help("randomness is keyed by (seed, prompt id, sample index)", 0)
    temperature: float = _help("sampling temperature; 0 = greedy", 1.0)
    top_p: float = _help("nucleus sampling mass (1 = off)", 1.0)
    top_k: int = _help("top-k filter (0 = off)", 0)
    chat_template: bool = _help("apply the checkpoint's chat template to text prompts", False)
    drafter: str = _help("drafter directory (EAGLE head or a standalone draft LM checkpoint), or builtin:eagle | "
                         "builtin:lm (the built-in actor's; built once and cached)", "")
    spec: str = _help("speculation: adaptive (the tuner picks off or k each decode iteration) | off | K (static draft length, "
                      "SGLang speculative_num_steps = K); adaptive without a drafter decodes plainly", "adaptive")
    speculative_num_steps: int = _help("SGLang's name: the deepest draft the adaptive tuner may choose (1..16)", 8)
    speculative_num_draft_tokens: int = _help(
        "SGLang's name: tokens verified per row per round; chain drafts verify num_steps + 1 (0 = derived)", 0)
    dtype: str = _help("float32 | bfloat16", "float32")
    device: str = _help("cpu | cuda", "cpu")
    max_batch: int = _help("maximum rows decoded together", 64)
    on_bad_row: str = _help("malformed input rows: stop (error naming the line) | skip (counted, line numbers reported)", "stop")

    def validate(self) -> None:
        from .rollout.sampling import SamplingParams

        SamplingParams(self.temperature, self.top_k, self.top_p)  # the one place sampling values are validated
        if not self.input:
            raise ConfigValueError("input is required (--input prompts.jsonl)")
        if not self.output:
            raise ConfigValueError("output is required (--output out.jsonl)")
        for key in ("n", "max_new_tokens", "max_batch"):
            if getattr(self, key) < 1:
                raise ConfigValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        spec_settings(self.spec, self.speculative_num_steps, self.speculative_num_draft_tokens)
        if self.on_bad_row not in ("stop", "skip"):
            raise ConfigValueError(f"on_bad_row must be 'stop' or 'skip', got {self.on_bad_row!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


def spec_settings(spec: str, num_steps: int, num_draft_tokens: int, prefix: str = "") -> tuple[int | str, int]:
    """Validate the speculation keys -> (0 | K | 'adaptive', deepest draft the tuner may choose).

    SGLang's keys mean the same here: speculative_num_steps is the draft depth, and with chain
    drafting (SGLang's speculative_eagle_topk = 1, the only shape respec drafts) the tokens verified
    per row are speculative_num_draft_tokens = num_steps + 1. `spec = K` is a static num_steps = K.
    """
    mode = parse_spec(spec, f"{prefix}spec")
    if not 1 <= num_steps <= 16:
        raise ConfigValueError(f"{prefix}speculative_num_steps must be in 1..16, got {num_steps!r}")
    depth = mode if isinstance(mode, int) and mode > 0 else num_steps
    if num_draft_tokens not in (0, depth + 1):
        raise ConfigValueError(
            f"{prefix}speculative_num_draft_tokens must be 0 (derived) or the draft depth + 1 = {depth + 1} "
            f"(chain drafts verify every drafted token plus one), got {num_draft_tokens!r}")
    return mode, num_steps


def parse_spec(value: str, key: str = "spec") -> int | str:
    """'off' -> 0, 'K' -> K (1..16), 'adaptive' -> 'adaptive'."""
    v = str(value).strip().lower()
    if v in ("off", "0", "none"):
        return 0
    if v == "adaptive":
        return "adaptive"
    if v.isdigit() and 1 <= int(v) <= 16:
        return int(v)
    raise ConfigValueError(f"{key} must be off, adaptive or an integer 1..16, got {value!r}")


# ---- generic machinery ---------------------------------------------------------------------------
def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, args[0], key)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigValueError(f"{key}: expected a list, got {value!r}")
        items = [_coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigValueError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}") from None
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate a (nested) config dataclass from a dict, rejecting unknown keys by name."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigValueError(f"unknown config key {prefix + sorted(unknown)[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, v in values.items():
        typ = _field_type(cls, known[name])
        key = prefix + name
        if is_dataclass(typ):
            if not isinstance(v, dict):
                raise ConfigValueError(f"{key}: expected a table of settings")
            kwargs[name] = build(typ, v, key + ".")
        else:
            kwargs[name] = _coerce(v, typ, key)
    return cls(**kwargs)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigValueError(f"config file {path}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per leaf field (`--section.key`), default suppressed so only given flags override."""
    for f in fields(cls):
        typ = _field_type(cls, f)
        name = prefix + f.name
        if is_dataclass(typ):
            add_arguments(parser, typ, name + ".")
            continue
        flags = [f"--{name}"]
        if "_" in name:
            flags.append("--" + name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=_metavar(typ),
                            help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"))


def _metavar(typ: Any) -> str:
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(typ, "VALUE")


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Flags actually given -> nested dict of overrides."""
    out: dict[str, Any] = {}
    leaf = set(_leaf_names(cls))
    for k, v in vars(args).items():
        if k not in leaf:
            continue
        d = out
        *path, last = k.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _leaf_names(cls: type, prefix: str = "") -> list[str]:
    names = []
    for f in fields(cls):
        typ = _field_type(cls, f)
        if is_dataclass(typ):
            names += _leaf_names(typ, prefix + f.name + ".")
        else:
            names.append(prefix + f.name)
    return names


def resolve(cls: type, config_file: str | None, overrides: dict[str, Any]) -> Any:
    values = load_toml(config_file) if config_file else {}
    return build(cls, merge(values, overrides))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def to_toml(obj: Any) -> str:
    """Serialize a (nested) config dataclass as TOML: scalars first, then one table per section."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if v is None:
            return '"none"'
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def emit(d: dict[str, Any], section: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if section:
            lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
        for k, v in tables.items():
            emit(v, f"{section}.{k}" if section else k)

    emit(dataclasses.asdict(obj), "")
    return "\n".join(lines).lstrip("\n") + "\n"


def parse_family_mix(text: str, key: str) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
    """"add=0.3,sub=0.4" -> (("add", "sub"), (0.3, 0.4)); "" -> None. ConfigValueError names `key`."""
    from .tasks.arithmetic import FAMILIES

    if not text.strip():
        return None
    names, weights = [], []
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            w = float(value) if sep else float("nan")
        except ValueError:
            w = float("nan")
        if name not in FAMILIES or name in names or not (0 <= w < float("inf")):
            raise ConfigValueError(f"{key} must be name=weight pairs with distinct names among {sorted(FAMILIES)} "
                                   f"and finite weights >= 0, got {text!r} (at {item.strip()!r})")
        names.append(name)
        weights.append(w)
    if sum(weights) <= 0:
        raise ConfigValueError(f"{key} needs a positive total weight, got {text!r}")
    return tuple(names), tuple(weights)


# ---- RL training (`respec train`) ----------------------------------------------------------------
# Sections of TrainConfig; `--rollout.group_size 8` on the command line, `[rollout] group_size = 8`
# in TOML. The trainer (respec/rl) reads these and never restates a default.
@dataclass(frozen=True)
class TrainDataConfig:
    dataset: str = _help("prompt file (.jsonl / .json / .parquet, TRL format); empty = the built-in arithmetic task", "")
    prompt_field: str = _help("column holding the prompt text", "prompt")
    answer_field: str = _help("column renamed to 'answer' (what the built-in exact_answer reward reads)", "answer")
    chat_template: bool = _help("apply the checkpoint's chat template to text prompts", False)
    task_seed: int = _help("seed of the built-in task's problem stream and held-out set", 0)
    stratify_families: bool = _help(
        "built-in task: every run of consecutive training prompts holds the family weights (a low-discrepancy "
        "sequence) instead of independent draws; the held-out set is unchanged", False)
    family_mix: str = _help(
        "built-in task: the families drawn and their relative weights, as name=weight pairs; the training stream "
        "and the held-out set both follow it. Empty = the task's own mix, the one the built-in actor was pretrained "
        "on (add=0.35,sub=0.15,chain=0.15,mul=0.35). The RL default leaves out chain (the base actor solves 2%: no "
        "signal) and draws sub most, the family with the most room (README: the embedded default workload)",
        "add=0.2,sub=0.6,mul=0.2")

    def families(self) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
        """data.family_mix parsed: (families, weights), or None for the task's own mix (empty)."""
        return parse_family_mix(self.family_mix, "data.family_mix")


@dataclass(frozen=True)
class TrainRolloutConfig:
    prompts_per_step: int = _help("prompts sampled per training step", 8)
    group_size: int = _help("responses per prompt (G); advantages are computed within each group", 4)
    max_new_tokens: int = _help("response budget; longer responses are cut (finish_reason 'length')", 300)
    temperature: float = _help("sampling temperature of the rollouts (> 0: the policy being trained)", 1.0)
    top_p: float = _help("nucleus mass of the rollouts (1 = off); the loss uses the recorded nucleus sizes", 1.0)
    top_k: int = _help("top-k of the rollouts (0 = off)", 0)
    spec: str = _help(
        "speculative rollouts: adaptive (the tuner picks off or k every decode iteration from the active batch) | off | "
        "K (static draft length 1..16); K needs rollout.drafter except with the built-in actor, adaptive without a "
        "drafter decodes plainly", "adaptive")
    speculative_num_steps: int = _help("SGLang's name: the deepest draft the adaptive tuner may choose (1..16)", 8)
    speculative_num_draft_tokens: int = _help(
        "SGLang's name: tokens verified per row per round; chain drafts verify num_steps + 1 (0 = derived)", 0)
    drafter: str = _help("drafter directory (EAGLE head or draft LM checkpoint) for rollout.spec, or builtin:eagle "
                         "(the built-in actor's default) | builtin:lm (its small standalone draft LM)", "")
    max_batch: int = _help("maximum rows the engine decodes together", 128)


@dataclass(frozen=True)
class OnlineDistillOptions:
    """The choices of online drafter distillation (drafter/online.py: the formulas, the modes and the
    measured default budget). `OnlineDistillConfig` adds the two facts about the run they apply to
    (rollout temperature, seed); `respec train` takes them from the run, so its [drafter] section is
    these fields plus `online`."""

    mode: str = _help("sync (in the trainer, blocking) | async (own process; the head swapped in at step N is the "
                      "update launched at N-1: reproducible) | latest (own process, never waits: not reproducible)", "async")
    launch: str = _help("when update N is submitted: after_rollout (at step N, once its rollouts are scored; it "
                        "overlaps only the actor's update, and step N+1 drafts with it) | step_start (at the start of "
                        "step N+1, from the same data; it overlaps step N+1's whole generate, and step N+2 drafts with "
                        "it: one step more lag)", "after_rollout")
    interval: int = _help("launch an update every I steps", 1)
    fraction: float = _help("fraction of each step's rollouts whose tokens enter the replay buffer", 0.25)
    buffer_mib: int = _help("replay buffer byte budget (MiB); oldest sequences dropped first", 256)
    max_age: int = _help("updates sample only sequences from the newest max_age steps", 4)
    top_k: int = _help("target log-probs kept per token (plus one 'other' bucket for the rest)", 16)
    tokens_per_update: int = _help("learner budget: committed tokens per update batch", 256)
    steps_per_update: int = _help("optimizer steps per update (over the same batch)", 1)
    lr: float = _help("AdamW learning rate of the head (1e-3 knocks the offline-trained head off its optimum: drafter/online.py)", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("gradient clipping (0 = off)", 1.0)
    depth: int = _help("training-time-test unroll steps", 3)
    step_decay: float = _help("loss weight of unroll step s is step_decay**(s-1)", 0.8)
    weighting: str = _help("per-sequence weight: none | reward | normalized | advantage (formulas in drafter/online.py)",
                           "normalized")
    weight_floor: float = _help("smallest weight a sequence gets (keeps failed samples in)", 0.5)
    weight_cap: float = _help("largest weight (normalized / advantage)", 2.0)
    timeout_s: float = _help("async: longest wait for an update at a step boundary (0 = as long as the learner lives)", 0.0)
    max_lag: int = _help("staleness guard: warn when the head is more than this many versions behind the actor", 4)
    collapse_fraction: float = _help("staleness guard: warn when acceptance length falls below this fraction of its best",
                                     0.6)

    def validate(self, prefix: str = "") -> None:
        """Raise ConfigValueError naming the first invalid key (`prefix` + field name)."""
        from .drafter.replay import WEIGHTINGS  # lazy: keeps this module free of torch

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigValueError(f"{prefix}{key} must be {what}, got {getattr(self, key)!r}")

        need(self.mode in ("sync", "async", "latest"), "mode", "sync, async or latest")
        need(self.launch in ("after_rollout", "step_start"), "launch", "after_rollout or step_start")
        need(self.weighting in WEIGHTINGS, "weighting", " | ".join(WEIGHTINGS))
        for key in ("interval", "buffer_mib", "max_age", "top_k", "tokens_per_update", "steps_per_update", "depth",
                    "max_lag"):
            need(getattr(self, key) >= 1, key, ">= 1")
        need(0 < self.fraction <= 1, "fraction", "in (0, 1]")
        need(self.lr > 0, "lr", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        need(0 < self.step_decay <= 1, "step_decay", "in (0, 1]")
        need(0 <= self.weight_floor <= self.weight_cap, "weight_floor", "in [0, weight_cap]")
        need(self.weight_cap > 0, "weight_cap", "> 0")
        need(self.timeout_s >= 0, "timeout_s", ">= 0")
        need(0 < self.collapse_fraction < 1, "collapse_fraction", "in (0, 1)")


ONLINE_SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainDrafterConfig(OnlineDistillOptions):
    online: str = _help(
        "online distillation of the rollouts' EAGLE head during training: auto (on when rollout.spec drafts with an "
        "EAGLE head, e.g. the built-in actor's, and the learner process has a core of its own: CUDA or 4+ CPUs; "
        "off for a standalone draft LM, no drafter or a 2-core CPU) | on | off", "auto")

    def validate(self, prefix: str = "drafter.") -> None:
        if self.online not in ONLINE_SETTINGS:
            raise ConfigValueError(f"{prefix}online must be auto, on or off, got {self.online!r}")
        super().validate(prefix)


@dataclass(frozen=True)
class TrainRLConfig:
    advantage: str = _help("grpo (group mean-centred / group std) | dr_grpo (mean-centred / constant)", "grpo")
    std_eps: float = _help("grpo: added to the group std before dividing", 1e-6)
    dr_grpo_scale: float = _help("dr_grpo: the constant the centred rewards are divided by", 1.0)
    aggregation: str = _help(
        "loss averaging: token (sum over all tokens / total tokens, DAPO) | sequence (mean per sequence, "
        "then mean) | constant (sum over tokens / (sequences * max_new_tokens), Dr.GRPO)", "token")
    clip_low: float = _help("ratio clip below: 1 - clip_low", 0.2)
    clip_high: float = _help("ratio clip above: 1 + clip_high (DAPO clip-higher uses 0.28)", 0.2)
    kl_beta: float = _help("weight of the k3 KL penalty to the frozen initial policy; 0 = no reference model", 0.0)
    epochs: int = _help("updates per rollout batch (mu): passes over the batch", 1)
    old_logprobs: str = _help(
        "behaviour log-probs for the ratio: engine (recorded by the rollout, no extra forward) | "
        "recompute (one no-grad forward with the training graph)", "engine")
    rewards: tuple[str, ...] = _help(
        "reward functions: built-in names (exact_answer) or import paths 'pkg.mod:fn' / 'file.py:fn'", ("exact_answer",))
    reward_weights: tuple[float, ...] = _help("one weight per reward function; empty = all 1", ())
    pass_threshold: float = _help("a response passes when its total reward >= this (pass rate metrics)", 1.0)
    skip_zero_advantage: bool = _help(
        "leave responses with advantage 0 (zero-variance groups) out of the training forward: their gradient is exactly "
        "0 when kl_beta = 0, so the update is the same and the train phase shorter", True)


@dataclass(frozen=True)
class TrainOptimConfig:
    lr: float = _help("peak AdamW learning rate", 1e-4)
    schedule: str = _help("after warm-up: cosine (down to min_lr_ratio * lr at the last step) | constant", "cosine")
    warmup_steps: int = _help("linear warm-up, in training steps", 10)
    min_lr_ratio: float = _help("cosine floor as a fraction of lr", 0.1)
    weight_decay: float = _help("AdamW weight decay (matrices only, not norms/biases)", 0.0)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.99)
    max_grad_norm: float = _help("clip the global gradient norm to this; 0 = no clipping (norm still logged)", 1.0)
    minibatch_size: int = _help("sequences per optimizer update; 0 = the whole rollout batch", 0)
    micro_batch_size: int = _help("sequences per forward/backward (gradient accumulation within a minibatch)", 16)


@dataclass(frozen=True)
class TrainEvalConfig:
    every: int = _help("evaluate every N steps (also before the first and after the last); 0 = only those two", 0)
    heldout: int = _help("held-out prompts scored (built-in task: its fixed held-out set)", 1000)
    dataset: str = _help("held-out prompt file when data.dataset is set; empty = no held-out evaluation", "")
    max_new_tokens: int = _help("response budget at evaluation; 0 = rollout.max_new_tokens", 0)


@dataclass(frozen=True)
class TrainOutputConfig:
    dir: str = _help("run directory; empty = runs/<timestamp>", "")
    tensorboard: bool = _help("also write TensorBoard scalars (needs the tensorboard package)", True)
    save_actor: bool = _help("save the trained actor (HF format) in <dir>/actor at the end (with online drafter "
                             "distillation on, also its EAGLE head in <dir>/drafter)", True)
    checkpoint_every: int = _help(
        "write a resumable checkpoint (<dir>/checkpoints/step-NNNNNN) every N steps and at the end; 0 = off", 50)
    keep_checkpoints: int = _help("checkpoints kept on disk (oldest deleted first); 0 = keep all", 2)
    plots: bool = _help("write PNG plots of the run's metrics into <dir>/plots at the end (needs matplotlib)", True)


@dataclass(frozen=True)
class TrainConfig:
    model: str = _help("actor checkpoint (HF format); empty = the built-in actor", "")
    steps: int = _help("training steps (one rollout batch each)", 600)
    seed: int = _help("run seed: prompts, sampling and minibatch order derive from (seed, step, purpose)", 0)
    device: str = _help("cpu | cuda", "cpu")
    data: TrainDataConfig = _section(TrainDataConfig, "prompts")
    rollout: TrainRolloutConfig = _section(TrainRolloutConfig, "generation of the training rollouts")
    drafter: TrainDrafterConfig = _section(
        TrainDrafterConfig, "online distillation of the drafter head from the rollouts (respec/drafter/online.py)")
    rl: TrainRLConfig = _section(TrainRLConfig, "advantages, loss and rewards")
    optim: TrainOptimConfig = _section(TrainOptimConfig, "optimizer and schedule")
    eval: TrainEvalConfig = _section(TrainEvalConfig, "held-out evaluation")
    output: TrainOutputConfig = _section(TrainOutputConfig, "run directory and logs")

    def validate(self) -> None:
        """Raise ConfigValueError naming the first invalid key (dotted, as on the command line)."""
        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                section, _, name = key.rpartition(".")
                value = getattr(getattr(self, section) if section else self, name)
                raise ConfigValueError(f"{key} must be {rule}, got {value!r}")

        r, rl, o, e = self.rollout, self.rl, self.optim, self.eval
        need(self.steps >= 1, "steps", ">= 1")
        need(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "device", "cpu or cuda")
        self.data.families()  # raises naming data.family_mix
        need(r.prompts_per_step >= 1, "rollout.prompts_per_step", ">= 1")
        need(r.group_size >= 2, "rollout.group_size", ">= 2 (advantages compare responses within a group)")
        need(r.max_new_tokens >= 1, "rollout.max_new_tokens", ">= 1")
        need(0 < r.temperature < float("inf"), "rollout.temperature", "a finite number > 0 (greedy rollouts have no gradient)")
        need(0 < r.top_p <= 1, "rollout.top_p", "in (0, 1]")
        need(r.top_k >= 0, "rollout.top_k", ">= 0")
        spec, _ = spec_settings(r.spec, r.speculative_num_steps, r.speculative_num_draft_tokens, "rollout.")
        need(spec in (0, "adaptive") or bool(r.drafter) or not self.model, "rollout.drafter",
             "a drafter directory when rollout.spec is a static K (the built-in actor has a cached default)")
        need(r.max_batch >= 1, "rollout.max_batch", ">= 1")
        self.drafter.validate("drafter.")
        need(not (self.drafter.online == "on" and spec == 0), "drafter.online",
             "auto or off when rollout.spec is off (it trains the drafter the rollouts draft with)")
        need(rl.advantage in ("grpo", "dr_grpo"), "rl.advantage", "grpo or dr_grpo")
        need(rl.std_eps >= 0, "rl.std_eps", ">= 0")
        need(rl.dr_grpo_scale > 0, "rl.dr_grpo_scale", "> 0")
        need(rl.aggregation in ("token", "sequence", "constant"), "rl.aggregation", "token, sequence or constant")
        need(0 <= rl.clip_low < 1, "rl.clip_low", "in [0, 1)")
        need(rl.clip_high >= 0, "rl.clip_high", ">= 0")
        need(rl.kl_beta >= 0, "rl.kl_beta", ">= 0")
        need(rl.epochs >= 1, "rl.epochs", ">= 1")
        need(rl.old_logprobs in ("engine", "recompute"), "rl.old_logprobs", "engine or recompute")
        need(len(rl.rewards) >= 1, "rl.rewards", "at least one reward function")
        need(not rl.reward_weights or len(rl.reward_weights) == len(rl.rewards), "rl.reward_weights",
             f"empty or one weight per reward function ({len(rl.rewards)})")
        need(o.lr > 0, "optim.lr", "> 0")
        need(o.schedule in ("cosine", "constant"), "optim.schedule", "cosine or constant")
        need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
        need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]")
        need(o.weight_decay >= 0, "optim.weight_decay", ">= 0")
        need(0 <= o.beta1 < 1, "optim.beta1", "in [0, 1)")
        need(0 <= o.beta2 < 1, "optim.beta2", "in [0, 1)")
        need(o.max_grad_norm >= 0, "optim.max_grad_norm", ">= 0")
        need(o.minibatch_size >= 0, "optim.minibatch_size", ">= 0")
        need(o.micro_batch_size >= 1, "optim.micro_batch_size", ">= 1")
        need(e.every >= 0, "eval.every", ">= 0")
        need(e.heldout >= 0, "eval.heldout", ">= 0")
        need(e.max_new_tokens >= 0, "eval.max_new_tokens", ">= 0")
        need(self.output.checkpoint_every >= 0, "output.checkpoint_every", ">= 0")
        need(self.output.keep_checkpoints >= 0, "output.keep_checkpoints", ">= 0")
