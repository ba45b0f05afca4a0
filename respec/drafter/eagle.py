"""EAGLE-3-style drafter head: one decoder layer over [token embedding ; fused target feature].

    feature_i = fc(cat(h_low_i, h_mid_i, h_high_i))           target layers' outputs at position i
    x_i       = cat(input_norm(embed(tok_{i+1})), hidden_norm(feature_i))          (B, q, 2H)
    h_i       = feature_i + attn(x_i);  h_i = h_i + mlp(post_norm(h_i))             drafter output
    logits    = lm_head(norm(h_i))  predicts tok_{i+2}

Alignment (the silent speed killer when wrong): the feature at position i pairs with the embedding
of token i+1. The pending token at position L (just sampled, not yet through the target) is paired
with feature L-1; a resampled or bonus token has no target feature until the next verify pass. For
draft steps after the first, the drafter's own output h replaces the fused target feature (that is
what the training-time-test unroll in `train_forward` teaches it to handle).

The target's embedding and LM head are shared: they are read from the current actor model at call
time and never stored in this module's state dict, so the drafter can never hold a stale copy.
They are read *detached* (`embed`, `logits`): distillation backpropagates through them into the
head, but must never leave gradients on the live actor's parameters, which the RL optimizer owns.
Layer choice rule (works for 2-layer targets; indices may repeat): (L//4, L//2, L-1), see default_feature_layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cache import KVCache
from ..models.config import ModelConfig
from ..models.linear import Linear
from ..models.rope import RopeTable, cos_sin, inv_frequencies
from ..models.transformer import MLP, Attention, Geometry, RMSNorm, Transformer, attend_cached, geometry
from ..rollout.sampling import SamplingParams
from .base import DraftContext, Proposal, sample_drafts_step


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and high decoder-layer outputs (0-based): (L//4, L//2, L-1).

    The high feature is the last layer's output (closest to the next-token distribution, what
    EAGLE-1 drafts from); low and middle add the lexical / intermediate signals EAGLE-3 fuses.
    Works for shallow targets by repeating indices: L=2 -> (0, 1, 1), L=1 -> (0, 0, 0).
    """
    return (num_layers // 4, num_layers // 2 if num_layers > 1 else 0, num_layers - 1)


@dataclass(frozen=True)
class EagleConfig:
    hidden_size: int
    vocab_size: int
    feature_layers: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    actor: str = ""  # name/path of the actor it was trained against (checked at load)

    @classmethod
    def for_target(cls, cfg: ModelConfig, actor: str = "", intermediate_size: int = 0) -> "EagleConfig":
        """The head for an actor; `intermediate_size` 0 = the actor's MLP width (a narrower MLP makes
        each draft step cheaper, at some cost in acceptance)."""
        return cls(
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
            feature_layers=default_feature_layers(cfg.num_layers), num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, intermediate_size=intermediate_size or cfg.intermediate_size,
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta, actor=actor,
        )

    def layer_config(self) -> ModelConfig:
        return ModelConfig(
            arch="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, rms_norm_eps=self.rms_norm_eps,
        )


class EagleHead(nn.Module):
    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        lc = cfg.layer_config()
        H = cfg.hidden_size
        self.fc = Linear(len(cfg.feature_layers) * H, H, bias=False)
        self.input_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.attn = Attention(lc, in_dim=2 * H)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = MLP(lc)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        inv_freq, _ = inv_frequencies(lc.rope.__class__(theta=cfg.rope_theta), lc.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_table = RopeTable()  # engine-time steps gather cos/sin from it

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> "EagleHead":
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    # ---- one layer, two attention modes ---------------------------------------------------------
    def _qkv(self, embeds, feats, cos, sin):
        x = torch.cat([self.input_norm(embeds), self.hidden_norm(feats)], dim=-1)  # (B, q, 2H)
        return self.attn.project(x, cos, sin)  # (B, n_heads, q, D), 2 x (B, n_kv, q, D)

    def _finish(self, feats, attn_out):
        B, q = feats.shape[:2]
        h = feats + self.attn.wo(attn_out.transpose(1, 2).reshape(B, q, -1))
        return h + self.mlp(self.post_norm(h))  # (B, q, H) drafter output hidden

    def step(self, embeds, feats, start, cache: KVCache) -> torch.Tensor:
        """Cached forward of q entries per row at positions start + arange(q) -> output hidden (B, q, H)."""
        B, q, _ = embeds.shape
        geo: Geometry = geometry(B, q, start, cache.max_len, embeds.device)
        cos, sin = self.rope_table(self.inv_freq, 1.0, geo.positions, embeds.dtype, cache.max_len)
        xq, xk, xv = self._qkv(embeds, feats, cos, sin)
        return self._finish(feats, attend_cached(xq, xk, xv, cache.k[0], cache.v[0], geo))

    @staticmethod
    def embed(target: Transformer, tokens: torch.Tensor) -> torch.Tensor:
        """The actor's (frozen, shared) token embedding: tokens (B, q) -> (B, q, H)."""
        return F.embedding(tokens, target.embed.weight.detach())

    def logits(self, target: Transformer, h: torch.Tensor) -> torch.Tensor:
        """Drafter output hidden (B, q, H) -> logits (B, q, V) through the actor's (frozen, shared) LM head."""
        return F.linear(self.norm(h), target.lm_head.weight.detach())

    # ---- training-time forward with the multi-step unroll -----------------------------------------
    def train_forward(self, target: Transformer, tokens: torch.Tensor, target_feats: torch.Tensor, depth: int):
        """Teacher-forced drafter logits for unroll steps 1..depth over whole sequences.

        tokens (B, T), target_feats (B, T, F). Entry i (0 <= i <= T-2) pairs feature i with token i+1.
        Step 1 uses true features and predicts tok_{i+2}. Step s >= 2 replaces the feature of entry i
        by the drafter's own step-(s-1) output at entry i-1, exactly as drafting does at inference:
        in a round starting at L = i - s + 2 the entry attends to the true entries [0, L) and to its
        own chain of draft entries L .. i (one per earlier step). Returns a list of `depth` tensors,
        step s giving logits (B, T-1, V); at every step entry i predicts tok_{i+2}, and only entries
        i >= s-1 are meaningful (earlier ones have no round that could produce them: mask them).
        """
        B, T = tokens.shape
        n = T - 1
        embeds = self.embed(target, tokens[:, 1:])  # (B, n, H): token i+1 for entry i
        positions = torch.arange(n, device=tokens.device).expand(B, n)
        cos, sin = cos_sin(self.inv_freq, 1.0, positions, embeds.dtype)
        feats = self.fc(target_feats[:, :n])  # (B, n, H)
        keys, values, outs = [], [], []
        a = self.attn
        rep = a.n_heads // a.n_kv
        idx = torch.arange(n, device=tokens.device)
        for s in range(1, depth + 1):
            if s > 1:  # drafter's own previous output at entry i-1 becomes the feature of entry i
                feats = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            xq, xk, xv = self._qkv(embeds, feats, cos, sin)
            keys.append(xk.repeat_interleave(rep, dim=1))
            values.append(xv.repeat_interleave(rep, dim=1))
            scale = 1.0 / math.sqrt(a.head_dim)
            # true entries j <= i - s + 1, then one key per step t = 2..s at entry i - s + t
            s1 = (xq @ keys[0].transpose(-1, -2)) * scale  # (B, Hq, n, n)
            s1 = s1.masked_fill(~(idx[None, :] <= (idx[:, None] - s + 1)), float("-inf"))
            diag_scores, diag_vals = [], []
            for t in range(2, s + 1):
                shift = s - t  # key entry = i - shift
                kt = torch.roll(keys[t - 1], shifts=shift, dims=2)  # kt[:, :, i] = keys[t-1][:, :, i-shift]
                vt = torch.roll(values[t - 1], shifts=shift, dims=2)
                diag_scores.append((xq * kt).sum(-1, keepdim=True) * scale)  # (B, Hq, n, 1)
                diag_vals.append(vt)
            scores = torch.cat([s1] + diag_scores, dim=-1)
            valid_row = (idx >= s - 1)[None, None, :, None]
            scores = torch.where(valid_row, scores, torch.zeros_like(scores))  # rows without context
            p = scores.float().softmax(-1).to(xq.dtype)
            y = p[..., :n] @ values[0]
            for t, vt in enumerate(diag_vals):
                y = y + p[..., n + t : n + t + 1] * vt
            h = self._finish(feats, y)
            outs.append(self.logits(target, h))
        return outs


class EagleDrafter:
    """Engine-side wrapper: the head, its KV cache, and the current actor whose embed/lm_head it uses."""

    def __init__(self, head: EagleHead, target: Transformer) -> None:
        self.head = head
        self.target = target  # the live actor: shared embedding and LM head are read from it
        self.feature_layers = head.cfg.feature_layers
        self.cache: KVCache | None = None

    def allocate(self, max_rows: int, max_len: int) -> None:
        lc = self.head.cfg.layer_config()
        p = next(self.head.parameters())
        self.cache = KVCache(1, max_rows, lc.num_kv_heads, max_len, lc.head_dim, p.dtype, p.device)

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        self.cache.move_rows(src, dst)

    @torch.no_grad()
    def propose(self, ctx: DraftContext, k: int, sampling: SamplingParams, u_draft: torch.Tensor) -> Proposal:
        B = ctx.target_len.shape[0]
        L, D = ctx.target_len, ctx.draft_len
        count = L - D  # entries to catch up per row (>= 1 except for a 1-token prompt: no feature yet)
        has_feature = count > 0
        count = count.clamp(min=1)
        c = int(count.max())
        j = torch.arange(c, device=L.device)
        entry = (D[:, None] + j).clamp(max=ctx.tokens.shape[1] - 2)  # (B, c) entry indices i
        rows = torch.arange(B, device=L.device)[:, None]
        feats = self.head.fc(ctx.features[rows, entry])  # (B, c, H) true fused features f_i
        embeds = self.head.embed(self.target, ctx.tokens[rows, entry + 1])  # (B, c, H) tok_{i+1}
        h = self.head.step(embeds, feats, D, self.cache)  # (B, c, H)
        h_last = h[torch.arange(B), count - 1][:, None]  # (B, 1, H): output of entry L-1
        toks, probs, oks = [], [], []
        for s in range(k):
            tok, pr, ok = sample_drafts_step(self.head.logits(self.target, h_last)[:, 0], sampling, u_draft[:, s])
            toks.append(tok), probs.append(pr), oks.append(ok)
            if s + 1 < k:  # draft entry L + s: (own output of previous entry, d_{s+1})
                h_last = self.head.step(self.head.embed(self.target, tok[:, None]), h_last, L + s, self.cache)
        return Proposal(
            tokens=torch.stack(toks, 1), probs=torch.stack(probs, 1),
            ok=torch.stack(oks, 1).all(1) & has_feature, committed_len=torch.where(has_feature, L, D),
        )

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return save_eagle(self.head, path)


def save_eagle(head: EagleHead, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """safetensors + config.json (+ extra_files, e.g. training stats), written to a temporary sibling
    directory and renamed into place. The shared embedding / LM head are not stored (they are the actor's)."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ..models.checkpoint import atomic_replace_dir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is a normal directory
    try:
        cfg = asdict(head.cfg)
        cfg["kind"] = "eagle3"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(tmp / "model.safetensors"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class DrafterError(ValueError):
    pass


def load_eagle(path: str | Path, target: Transformer, actor: str | None = None) -> EagleHead:
    """Load a saved head and check it against the actor: hidden size, vocabulary, layers, name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DrafterError(f"{path}/config.json: cannot be read ({e})") from None
    if raw.pop("kind", "eagle3") != "eagle3":
        raise DrafterError(f"{path}: not an EAGLE drafter")
    try:
        raw["feature_layers"] = tuple(int(i) for i in raw["feature_layers"])
        cfg = EagleConfig(**raw)
    except (KeyError, TypeError, ValueError) as e:
        raise DrafterError(f"{path}/config.json: not a valid EAGLE drafter config ({e!r})") from None
    tc = target.cfg
    if cfg.hidden_size != tc.hidden_size:
        raise DrafterError(f"{path}: drafter hidden size {cfg.hidden_size} != actor hidden size {tc.hidden_size}")
    if cfg.vocab_size != tc.vocab_size:
        raise DrafterError(f"{path}: drafter vocabulary {cfg.vocab_size} != actor vocabulary {tc.vocab_size}")
    if max(cfg.feature_layers) >= tc.num_layers:
        raise DrafterError(f"{path}: feature layers {cfg.feature_layers} exceed the actor's {tc.num_layers} layers")
    if actor is not None and cfg.actor and Path(cfg.actor).name != Path(actor).name:
        raise DrafterError(f"{path}: drafter was trained against actor {cfg.actor!r}, not {actor!r}")
    head = EagleHead(cfg)
    try:
        sd = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise DrafterError(f"{path}/model.safetensors: truncated or corrupt ({e})") from None
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise DrafterError(f"{path}: weights do not match config.json ({e})") from None
    return head.to(device=target.device, dtype=target.dtype).eval()
