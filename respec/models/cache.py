"""An explicit, preallocated KV cache: `max_rows` slots x `max_len` positions per layer.

Invariants (the engine relies on them):
  * The cache stores tensors only. Per-row committed lengths are owned by the caller (the rollout
    engine) and passed to each forward as `start`; the model never advances them as a side effect.
  * Rolling back rejected draft positions is a length write in the caller: entries past a row's
    length are garbage and are never attended to (masks come from lengths, never from token ids).
  * Active rows occupy slots [0, n). When rows finish, the engine moves the last active rows into
    the freed slots (`move_rows`), so each forward reads a contiguous prefix view with no gather and
    the per-step cost never includes copying the whole cache.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """K and V for every layer: (num_layers, max_rows, num_kv_heads, max_len, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, max_rows, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, max_rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> "KVCache":
        return cls(cfg.num_layers, max_rows, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, device)

    @property
    def max_rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A view of slots [lo, hi) sharing storage (used to prefill newly admitted rows)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, lo:hi], self.v[:, lo:hi]
        return view

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move_rows(self, src: list[int], dst: list[int]) -> None:
        """Copy slots `src` into slots `dst` (compaction after rows finish, or prefix sharing)."""
        if not src:
            return
        s = torch.as_tensor(src, device=self.k.device)
        d = torch.as_tensor(dst, device=self.k.device)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Share one prefilled prompt: copy positions [0, length) of slot `src` into slots `dst`."""
        if not dst:
            return
        d = torch.as_tensor(dst, device=self.k.device)
        self.k[:, d, :, :length] = self.k[:, src : src + 1, :, :length]
        self.v[:, d, :, :length] = self.v[:, src : src + 1, :, :length]
