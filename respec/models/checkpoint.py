"""Hugging Face checkpoint directories <-> our `Transformer`.

Loading reads config.json, weights from model.safetensors or a sharded set named by
model.safetensors.index.json (safetensors only: nothing is ever unpickled), generation_config.json
(whose eos_token_id may be a list) and the tokenizer. HF names are mapped onto our fused layout
(q/k/v -> wqkv, gate/up -> w_gate_up). Saving does the inverse and writes atomically: everything
goes into a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint where a good one stood.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .tokenizer import Tokenizer
from .rope import inv_frequencies
from .transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer | None
    eos_token_ids: tuple[int, ...]  # union of config.json and generation_config.json eos ids
    path: Path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (choose from {', '.join(_DTYPES)})")
    return _DTYPES[name]


# ---- name mapping ---------------------------------------------------------------------------------
def _hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj", "q_norm": p + "self_attn.q_norm", "k_norm": p + "self_attn.k_norm",
        "gate": p + "mlp.gate_proj", "up": p + "mlp.up_proj", "down": p + "mlp.down_proj",
        "ln1": p + "input_layernorm", "ln2": p + "post_attention_layernorm",
    }


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our fused parameters -> HF tensor names (contiguous copies, ready for safetensors)."""
    cfg = model.cfg
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        n = _hf_layer_names(i)
        a = layer.attn
        for part, w in zip("qkv", a.wqkv.weight.split(a.split, dim=0)):
            sd[n[part] + ".weight"] = w
        if a.wqkv.bias is not None:
            for part, b in zip("qkv", a.wqkv.bias.split(a.split, dim=0)):
                sd[n[part] + ".bias"] = b
        sd[n["o"] + ".weight"] = a.wo.weight
        if a.q_norm is not None:
            sd[n["q_norm"] + ".weight"] = a.q_norm.weight
            sd[n["k_norm"] + ".weight"] = a.k_norm.weight
        gate, up = layer.mlp.w_gate_up.weight.split(cfg.intermediate_size, dim=0)
        sd[n["gate"] + ".weight"], sd[n["up"] + ".weight"] = gate, up
        sd[n["down"] + ".weight"] = layer.mlp.w_down.weight
        if cfg.mlp_bias:
            g_b, u_b = layer.mlp.w_gate_up.bias.split(cfg.intermediate_size, dim=0)
            sd[n["gate"] + ".bias"], sd[n["up"] + ".bias"] = g_b, u_b
            sd[n["down"] + ".bias"] = layer.mlp.w_down.bias
        sd[n["ln1"] + ".weight"] = layer.attn_norm.weight
        sd[n["ln2"] + ".weight"] = layer.mlp_norm.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """HF tensor names -> our parameter names; raises CheckpointError naming any missing tensor."""

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        return sd[name]

    out = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        n = _hf_layer_names(i)
        p = f"layers.{i}."
        out[p + "attn.wqkv.weight"] = torch.cat([take(n[x] + ".weight") for x in "qkv"], dim=0)
        if cfg.qkv_bias:
            out[p + "attn.wqkv.bias"] = torch.cat([take(n[x] + ".bias") for x in "qkv"], dim=0)
        out[p + "attn.wo.weight"] = take(n["o"] + ".weight")
        if cfg.qk_norm:
            out[p + "attn.q_norm.weight"] = take(n["q_norm"] + ".weight")
            out[p + "attn.k_norm.weight"] = take(n["k_norm"] + ".weight")
        out[p + "mlp.w_gate_up.weight"] = torch.cat([take(n["gate"] + ".weight"), take(n["up"] + ".weight")], dim=0)
        out[p + "mlp.w_down.weight"] = take(n["down"] + ".weight")
        if cfg.mlp_bias:
            out[p + "mlp.w_gate_up.bias"] = torch.cat([take(n["gate"] + ".bias"), take(n["up"] + ".bias")], dim=0)
            out[p + "mlp.w_down.bias"] = take(n["down"] + ".bias")
        out[p + "attn_norm.weight"] = take(n["ln1"] + ".weight")
        out[p + "mlp_norm.weight"] = take(n["ln2"] + ".weight")
    return out


# ---- loading --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointError(f"{path}: only safetensors weights are loaded (pickle files are never unpickled)")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: weights file is missing")
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: weights file is truncated or corrupt ({e})") from None
    return sd


def load_pretrained(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> Pretrained:
    """Load an HF-format checkpoint directory (Llama / Qwen2 / Qwen2.5 / Qwen3)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        cfg = ModelConfig.from_hf(_read_json(path / "config.json"), source=str(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    torch_dtype = parse_dtype(dtype)
    sd = {k: v.to(torch_dtype) for k, v in from_hf_state_dict(cfg, _load_tensors(path), str(path)).items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    for name, t in sd.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values")
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = Transformer(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match config.json ({e})") from None
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = inv_frequencies(cfg.rope, cfg.head_dim)[0]
    model.to(device)
    model.eval()

    eos = list(cfg.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.is_file():
        g = _read_json(gen).get("eos_token_id")
        for e in g if isinstance(g, list) else ([] if g is None else [g]):
            if e not in eos:
                eos.append(int(e))
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(
                f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{cfg.vocab_size} (vocabulary mismatch)"
            )
        if not eos and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
    return Pretrained(model=model, tokenizer=tokenizer, eos_token_ids=tuple(eos), path=path)


# ---- saving ---------------------------------------------------------------------------------------
def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory `tmp` to `final`, replacing any previous one."""
    old = None
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    eos_token_ids: tuple[int, ...] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an HF-format checkpoint that transformers loads unchanged; atomic (temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is a normal directory
    try:
        cfg = model.cfg
        dtype_name = {v: k for k, v in _DTYPES.items()}[model.dtype]
        hf = cfg.replace(torch_dtype=dtype_name).to_hf()
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        eos = list(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
               "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _fsync_dir(tmp)
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
