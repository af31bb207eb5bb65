"""A key/value cache for a generation loop of your own, on ``attention_with_kv_cache``."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops

__all__ = ["KVCache"]


class KVCache:
    """Preallocated keys and values of ``batch`` sequences, with each sequence's length.

    The caches are ``k`` (batch, kv_heads, max_len, head_dim) and ``v`` (batch, kv_heads,
    max_len, value_dim), allocated once with ``torch.empty`` (entries past a sequence's length
    are never read, whatever they hold); ``lengths`` (batch,) int64 counts each sequence's valid
    entries. :meth:`attend` writes the new keys and values after them, attends, and advances
    ``lengths``: one call per layer and step of a decoder.

    Example, a prompt of 5 tokens then one token at a time (one layer shown)::

        import torch
        from qkv_attention import KVCache

        batch, heads, kv_heads, head_dim = 2, 8, 2, 64
        cache = KVCache(batch, kv_heads, max_len=128, head_dim=head_dim)
        with torch.no_grad():
            q = torch.randn(batch, heads, 5, head_dim)
            k = torch.randn(batch, kv_heads, 5, head_dim)
            v = torch.randn(batch, kv_heads, 5, head_dim)
            out = cache.attend(q, k, v)   # prefill: (2, 8, 5, 64), causal
            for step in range(3):
                q = torch.randn(batch, heads, 1, head_dim)
                k = torch.randn(batch, kv_heads, 1, head_dim)
                v = torch.randn(batch, kv_heads, 1, head_dim)
                out = cache.attend(q, k, v)   # (2, 8, 1, 64): sees 6, 7, 8 keys
        cache.lengths          # tensor([8, 8])
        cache.reset()          # every sequence empty again; reset(1) empties sequence 1 only

    Sequences may have different lengths (prompts of different sizes): fill ``lengths`` or
    use :meth:`reset` per sequence, or pass ``advance`` to :meth:`attend`. The op never
    modifies ``lengths`` itself; :meth:`attend` does, after the op has succeeded.

    A quantized cache (``dtype=torch.int8``, ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``)
    stores each cached key and value row as codes and a float32 scale per (position, head):
    ``k_scale`` and ``v_scale`` (batch, kv_heads, max_len), owned here beside ``k`` and ``v``.
    :meth:`attend` then takes float query/key/value (float32, bfloat16, float16): the new rows
    are quantized as they are written, and the output has the query's dtype. A cache of
    ``max_len`` entries takes a quarter of float32's memory (rows and scales: D + 4 bytes per
    row of D). :meth:`dequantized` gives the cache's values as floats.

    Inference only: call it under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """

    QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        value_dim: Optional[int] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        value_dim = head_dim if value_dim is None else value_dim
        for name, size in (
            ("batch", batch),
            ("kv_heads", kv_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
            ("value_dim", value_dim),
        ):
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"KVCache: {name} must be a non-negative int, but is {size!r}")
        self.k = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, kv_heads, max_len, value_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.k.device)
        # The scales of a quantized cache, (batch, kv_heads, max_len) float32; None otherwise.
        self.k_scale: Optional[Tensor] = None
        self.v_scale: Optional[Tensor] = None
        if self.k.dtype in self.QUANTIZED_DTYPES:
            shape = (batch, kv_heads, max_len)
            self.k_scale = torch.empty(shape, dtype=torch.float32, device=self.k.device)
            self.v_scale = torch.empty(shape, dtype=torch.float32, device=self.k.device)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def dequantized(self) -> "tuple[Tensor, Tensor]":
        """The cached keys and values as float32 (batch, kv_heads, max_len, ·): ``stored *
        scale`` for a quantized cache, the caches themselves otherwise. Entries past a
        sequence's length hold whatever the memory held."""
        if not self.quantized:
            return self.k, self.v
        return (
            self.k.to(torch.float32) * self.k_scale.unsqueeze(-1),
            self.v.to(torch.float32) * self.v_scale.unsqueeze(-1),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = True,
        scale: Optional[float] = None,
        advance: Optional[Tensor] = None,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        alibi_slopes: Optional[Tensor] = None,
        sinks: Optional[Tensor] = None,
    ) -> Tensor:
        """Writes key/value (batch, kv_heads, L_new, ·) after each sequence's entries, attends
        query (batch, heads, L, head_dim) over them (causal aligned bottom-right, see
        :func:`qkv_attention.ops.attention_with_kv_cache`), and advances ``lengths`` by L_new.

        advance: (batch,) bool, the sequences whose length grows (default: all). A sequence
            left out still gets the new entries written after its length, so its next call
            overwrites them: a finished sequence in a batch keeps its length this way.
        window_size, softcap, alibi_slopes, sinks: the variants of
            :func:`qkv_attention.ops.attention`, aligned bottom-right like is_causal: with
            ``window_size=(w - 1, 0)`` a step reads only each sequence's last w entries.

        Returns (batch, heads, L, value_dim). Raises, with nothing written and ``lengths``
        unchanged, when a sequence would pass ``max_len``.
        """
        output = ops.attention_with_kv_cache(
            query,
            self.k,
            self.v,
            key,
            value,
            self.lengths,
            attn_mask,
            is_causal,
            scale,
            window_size,
            softcap,
            alibi_slopes,
            sinks,
            self.k_scale,
            self.v_scale,
        )
        step = key.shape[2]
        if advance is None:
            self.lengths += step
        else:
            self.lengths += advance.to(self.lengths.dtype) * step
        return output

    def reset(self, index=None) -> None:
        """Empties every sequence, or those ``index`` selects (an int, a slice, a list or a
        bool/int tensor, as in ``lengths[index]``). The memory is kept and not cleared."""
        if index is None:
            self.lengths.zero_()
        else:
            self.lengths[index] = 0

    def __repr__(self) -> str:
        batch, kv_heads, max_len, head_dim = self.k.shape
        return (
            f"KVCache(batch={batch}, kv_heads={kv_heads}, max_len={max_len}, "
            f"head_dim={head_dim}, value_dim={self.v.shape[3]}, dtype={self.k.dtype}, "
            f"lengths={self.lengths.tolist()})"
        )
