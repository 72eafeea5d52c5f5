"""Ops whose stock PyTorch CPU kernels are slow, written with fewer passes over memory. Each computes what the
plain PyTorch expression computes (tests/test_fast_paths.py): eager attention (taken per model.attn_impl), RMSNorm
(taken by the RMSNorm module on CPUs) and dropout (the Dropout module and eager attention, on CPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xlab.device import cpu_has_fast_bf16

# On a CPU in bf16, SDPA's flash kernel is 1.5-4x slower than plain matmul + softmax up to 1024 tokens of context; in
# fp32 it is as fast or faster (benchmarks/attention.py). The eager path stores the (T x T) scores, so "auto" takes
# it only up to this many tokens.
EAGER_MAX_LEN = 512


# Read once: a dynamo-traced forward sees a constant. Without AMX/AVX512-BF16 (AVX2 only) a CPU's bf16 matmuls are
# far slower than fp32 (BENCHMARKS.md, decoding on the AVX2 VM). This picks kernels for a model already in bf16
# (dtype=bf16 chosen explicitly); which precision `auto` picks is xlab.device.auto_precision's rule.
CPU_BF16_IS_SLOW = not cpu_has_fast_bf16()


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention runs in: bf16 without autocast (a model cast for decoding or bf16 evaluation) on a CPU
    whose bf16 matmuls are slow runs in fp32, where a decode step's attention over 256 cached keys (12 heads of 64)
    takes 64 us against bf16's 286 (`benchmarks/attention.py --decode`); the weights' matmuls keep their dtype. Under
    autocast the dtype stays autocast's choice."""
    if (dtype == torch.bfloat16 and device.type == "cpu" and CPU_BF16_IS_SLOW
            and not torch.is_autocast_enabled("cpu")):
        return torch.float32
    return dtype


def use_eager_attention(impl: str, q: torch.Tensor, causal_from_start: bool) -> bool:
    """Whether model.attn_impl takes the eager path for these queries: "eager" always, "sdpa" never, "auto" for
    low-precision causal attention on a CPU at short context."""
    if impl != "auto":
        return impl == "eager"
    return (causal_from_start and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] <= EAGER_MAX_LEN)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """softmax(q·kᵀ/√d + causal or given mask)·v, as transformers' "eager" attention: scores in the matmul's dtype
    (bf16 under autocast), the softmax accumulated in fp32 inside the kernel. mask: bool, True = may attend,
    broadcastable to (B, H, T, S); None = causal from position 0."""
    if k.shape[1] != q.shape[1]:  # grouped key/value heads: repeat each for the query heads that read it
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    t, s = q.shape[-2], k.shape[-2]
    if mask is None:
        bias = torch.full((t, s), float("-inf"), device=q.device).triu(s - t + 1)
    else:
        bias = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = torch.add(bias.to(scores.dtype), scores, alpha=q.shape[-1] ** -0.5)
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs.to(v.dtype), v)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in fp32, as torch.nn.functional.rms_norm; ~2x faster on a CPU,
    where rms_norm's backward runs as a dozen separate ops."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        xf = x.float()
        mean_square = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = torch.rsqrt(mean_square.add_(eps))
        normed = xf * rstd
        ctx.save_for_backward(normed, rstd, weight)
        ctx.x_dtype = x.dtype
        return (normed * weight).to(torch.result_type(x, weight))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.float()
        grad_weight = (grad * normed).flatten(0, -2).sum(0)
        grad_normed = grad * weight
        # d(normed)/dx projects out the component along normed: rstd * (g - normed * mean(g * normed))
        dot = torch.linalg.vecdot(grad_normed, normed).unsqueeze_(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight.to(weight.dtype), None


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout(x, p) in training: each element zeroed with probability p (to 1/65536), the rest scaled by 1/(1-p).
    On a CPU torch draws one Bernoulli sample per element; this draws 64 random bits per 4 elements and compares
    them as int16: forward + backward over the default layer's 4M attention probabilities 16.5 ms against 30.7
    (`benchmarks/dropout.py`, BENCHMARKS.md). Elsewhere, and under torch.compile, F.dropout."""
    if p <= 0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or p >= 1:
        return F.dropout(x, p)
    return _Dropout.apply(x, p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):  # type: ignore[override]
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768  # P(keep) = 1 - p
        scaled = keep.to(x.dtype).mul_(1 / (1 - p))  # in x's dtype, as F.dropout scales its mask
        ctx.save_for_backward(scaled)
        return x * scaled

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (scaled,) = ctx.saved_tensors
        return grad * scaled, None


class Dropout(torch.nn.Dropout):
    """nn.Dropout through fast_dropout (its CPU fast path); set_dropout changes p as on nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p) if self.training else x
