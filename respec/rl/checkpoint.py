"""Resumable training checkpoints: write atomically, verify before loading, never unpickle.

Layout of one checkpoint, <run>/checkpoints/step-NNNNNN/ (NNNNNN = training steps completed):
    actor.safetensors      the actor's parameters and buffers (raw state dict; shared tensors once)
    optimizer.safetensors  every tensor of the AdamW state, named "<param index>/<key>" (exp_avg, ...)
    optimizer.json         the non-tensor optimizer state: param_groups and any scalar state
    rng.safetensors        torch's global CPU (and CUDA) generator states - belt and braces only:
                           the trainer draws all its randomness from explicit generators keyed by
                           (seed, step, purpose) and the engine from per-request keys, so the step
                           counter alone already fixes every later random choice
    trainer.json           step, data position (prompts consumed = step * rollout.prompts_per_step;
                           prompt sources are pure functions of the step) and the rollout policy's
                           state when it has one (the adaptive tuner's acceptance EMA and controller)
    drafter.safetensors    with online drafter distillation on: the head, its AdamW state, the
    drafter.json           replay buffer and the update launched before the checkpoint (awaited,
                           stored unapplied: the next step swaps it in, as the uninterrupted run
                           does), plus the version, failure count and staleness guard (JSON part)
    manifest.json          sha256 and size of every file above

Writing: everything goes into a temporary sibling directory; each file and the directory are
fsync'd, the directory is renamed to step-NNNNNN, and only then is `checkpoints/latest` (a one-line
file naming the directory) replaced through temp file + rename. A crash at any point leaves the
previous checkpoint and the previous `latest` untouched. Loading checks every manifest entry
(present, size, sha256) and refuses a damaged checkpoint with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..io import atomic_write_text
from ..models.checkpoint import atomic_replace_dir
from ..tuner import AdaptiveK
from ..tuner.controller import CostProfile

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "respec-train-checkpoint/1"


class CheckpointCorruptError(ValueError):
    """A checkpoint that fails verification; the message names the file and what is wrong."""


@runtime_checkable
class Stateful(Protocol):
    """A rollout policy whose learned state survives a resume (e.g. the tuner's acceptance model)."""

    def state(self) -> dict: ...

    def load_state(self, s: dict) -> None: ...


@runtime_checkable
class TensorStateful(Protocol):
    """Trainer state with tensors (the online drafter): (tensors, JSON metadata) out and back in."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


@dataclass(frozen=True)
class TrainState:
    """What a checkpoint restores besides tensors: where the run stands."""

    step: int  # training steps completed
    data_position: int  # prompts consumed so far
    policy_state: dict | None


def policy_state(policy: object | None) -> dict | None:
    """The rollout policy's resumable state: its own state(), or the adaptive tuner's EMA + controller."""
    if isinstance(policy, Stateful):
        return policy.state()
    if isinstance(policy, AdaptiveK):
        return {"acceptance": policy.acceptance.state(), "current": policy.current, "dwell": policy.dwell,
                "last_batch": policy.last_batch, "iteration": policy.iteration, "profile": policy.profile.to_dict(),
                "explore_intervals": {str(c): v for c, v in policy.explore_intervals.items()},
                "acceptance_by_cell": {str(c): m.state() for c, m in policy.by_cell.items()}}
    return None


def load_policy_state(policy: object | None, s: dict | None) -> None:
    if s is None:
        return
    if isinstance(policy, Stateful):
        policy.load_state(s)
    elif isinstance(policy, AdaptiveK):
        policy.acceptance.load_state(s["acceptance"])
        policy.current, policy.dwell, policy.last_batch = s["current"], s["dwell"], s["last_batch"]
        policy.iteration = s.get("iteration", 0)
        policy.explore_intervals = {int(c): int(v) for c, v in s.get("explore_intervals", {}).items()}
        policy.by_cell = {}
        for c, st in s.get("acceptance_by_cell", {}).items():
            policy.by_cell[int(c)] = policy.acceptance.empty_like()
            policy.by_cell[int(c)].load_state(st)
        if "profile" in s:  # the costs the run decided with, not a re-measured (noisy) profile
            policy.profile = CostProfile.from_dict(s["profile"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


# ---- optimizer state <-> (tensors, JSON) -----------------------------------------------------------
def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}/{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalar_state": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, st in meta["scalar_state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- writing -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_states() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def save_checkpoint(
    root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    data_position: int, policy: object | None = None, keep: int = 0, drafter: TensorStateful | None = None,
) -> Path:
    """Write root/step-NNNNNN atomically, then point root/latest at it; keep the newest `keep` (0 = all).
    `drafter`: the online drafter's state, when distillation is on."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        save_model(model, str(tmp / "actor.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta, indent=1) + "\n")
        save_file(_rng_states(), str(tmp / "rng.safetensors"))
        trainer_state = {"format": FORMAT, "step": step, "data_position": data_position,
                         "policy_state": policy_state(policy)}
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        if drafter is not None:
            d_tensors, d_meta = drafter.state()
            save_file(d_tensors, str(tmp / "drafter.safetensors"))
            (tmp / "drafter.json").write_text(json.dumps(d_meta) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": FORMAT, "step": step,
                    "files": {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        atomic_replace_dir(tmp, final)  # a resumed run re-reaching a step it had saved replaces that copy
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep:
        saved = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in saved[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading -------------------------------------------------------------------------------------
def latest_checkpoint(root: Path) -> Path:
    """The directory root/latest names; errors name the missing piece."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        raise CheckpointCorruptError(f"{pointer}: no checkpoint pointer (was output.checkpoint_every 0?)")
    name = pointer.read_text().strip()
    path = Path(root) / name
    if not name.startswith("step-") or not path.is_dir():
        raise CheckpointCorruptError(f"{pointer}: names {name!r}, which is not a checkpoint directory")
    return path


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every manifest entry; return the manifest. Raises CheckpointCorruptError naming the file."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{mpath}: unreadable checkpoint manifest ({e})") from None
    for name, entry in files.items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointCorruptError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointCorruptError(f"{f}: {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        if _sha256(f) != entry["sha256"]:
            raise CheckpointCorruptError(f"{f}: sha256 does not match the manifest (corrupt)")
    for required in ("actor.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.json"):
        if required not in files:
            raise CheckpointCorruptError(f"{Path(path) / required}: missing from the manifest")
    return manifest


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, policy: object | None = None,
    drafter: TensorStateful | None = None,
) -> TrainState:
    """Verify, then restore model, optimizer, RNG, policy and online drafter state in place;
    safetensors/JSON only."""
    path = Path(path)
    files = verify_checkpoint(path)["files"]
    if drafter is not None:
        for name in ("drafter.safetensors", "drafter.json"):
            if name not in files:
                raise CheckpointCorruptError(f"{path / name}: missing; the run has online drafter distillation "
                                             "on but this checkpoint has no drafter state (drafter.online was off?)")

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path / name))
        except SafetensorError as e:
            raise CheckpointCorruptError(f"{path / name}: {e}") from None

    state = json.loads((path / "trainer.json").read_text())
    if state.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path / 'trainer.json'}: unknown format {state.get('format')!r}")
    try:
        missing, unexpected = load_model(model, str(path / "actor.safetensors"), strict=False,
                                         device=str(next(model.parameters()).device))
    except SafetensorError as e:
        raise CheckpointCorruptError(f"{path / 'actor.safetensors'}: {e}") from None
    if missing or unexpected:
        raise CheckpointCorruptError(f"{path / 'actor.safetensors'}: does not fit the model "
                                     f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer(tensors("optimizer.safetensors"), meta))
    if (path / "rng.safetensors").is_file():
        rng = tensors("rng.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    load_policy_state(policy, state["policy_state"])
    if drafter is not None:
        drafter.load_state(tensors("drafter.safetensors"), json.loads((path / "drafter.json").read_text()))
    return TrainState(step=int(state["step"]), data_position=int(state["data_position"]),
                      policy_state=state["policy_state"])
