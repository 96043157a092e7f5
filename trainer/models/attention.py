"""Attention backends, chosen by config: ``sdpa`` (torch's fused kernels, the default), ``xformers`` (optional,
CUDA only) and ``math`` (an explicit softmax(QK^T/sqrt(d))V, the reference for tests)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .norm import cpu_bf16

# Largest score matrix (batch x heads x queries x keys) that bf16 CPU attention computes explicitly.
CPU_BF16_EXPLICIT_MAX_SCORES = 1 << 24


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if cpu_bf16(q):
        # torch's bf16 CPU flash-attention backward is ~14x slower than fp32's, and at the demo's token counts
        # (4-64) the fp32 flash kernel is 2-4x slower than an explicit bf16 QK^T with an fp32 softmax
        # (docs/benchmarks.md, issue 19, P20); long sequences keep the fused fp32 kernel (no N x M scores).
        with torch.autocast("cpu", enabled=False):
            if q.shape[:-1].numel() * k.shape[-2] <= CPU_BF16_EXPLICIT_MAX_SCORES:
                return _math(q, k, v)
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16/fp16 scores: an fp32 softmax
    return scores.softmax(dim=-1, dtype=softmax_dtype).to(v.dtype) @ v


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda:
        raise RuntimeError("attention=xformers runs on CUDA devices only; use attention=sdpa on CPU")
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


BACKENDS = {"sdpa": _sdpa, "math": _math, "xformers": _xformers}


def check_backend(backend: str) -> None:
    """Fail at model build (not at the first step) on an unknown or unusable backend."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if backend in ("xformers",):
        try:
            import xformers.ops  # noqa: F401
        except ImportError as exc:
            raise ImportError("attention=xformers needs the optional xformers package (GPU only)") from exc


def dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"
) -> torch.Tensor:
    """Attention over (batch, heads, tokens, head_dim) tensors; returns the same layout as ``q``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend](q, k, v)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) to ``context`` (B, M, context_dim), or to itself."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: str = "sdpa",
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head, self.backend = heads, dim_head, backend
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
        out = dot_product_attention(q, k, v, self.backend)
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
