"""The language-model head and its loss, fused: hidden states → (objective, cross-entropy, correct) sums without
materialising the (tokens × vocab) logits.

The plain way (logits = head(h); F.cross_entropy(logits.float(), y)) writes the full logits, an fp32 copy, the
log-softmax and, in backward, a zero-filled gradient of the same size: with a vocabulary of 8192 and 2048 tokens
that is four passes over 64 MB, slower than the head's own matmul on a CPU. Here the rows go through in chunks
small enough to stay in cache: logits of a chunk → loss, accuracy and the logits' gradient (softmax − one-hot) at
once → the gradients of the hidden states and of the head weight, kept for backward (Liger-Kernel's fused linear
cross-entropy does the same on GPUs). The head weight's gradient is summed in fp32 over chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CHUNK_ELEMENTS = {"cpu": 1 << 22, "default": 1 << 25}  # logits per chunk: ~16 MB fp32 on CPU (in L3), 128 MB else


class LossSums(NamedTuple):
    """Summed over the tokens of a batch: the training objective (cross-entropy + z-loss; the one to backprop),
    the cross-entropy, and the number of tokens whose argmax prediction is the target."""

    objective: torch.Tensor
    ce: torch.Tensor
    correct: torch.Tensor


def head_loss_sums(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    softcap: float | None = None, z_loss: float = 0.0,
) -> LossSums:
    """Loss sums of logits = softcap(h @ weight.T) against targets, computed chunk by chunk. h: (..., d),
    weight: (vocab, d), targets: h's leading shape. Under autocast the matmuls run in its dtype and the softmax in
    fp32, as they would unfused. Only `objective` carries a gradient."""
    if torch.compiler.is_compiling():
        # Inside torch.compile this runs eagerly (a graph break): traced by torch 2.13, the Function's outputs came
        # back without a grad_fn. Decorating the function instead would import torch._dynamo (~1 s) at start-up.
        return torch.compiler.disable(_head_loss_sums)(h, weight, targets, softcap, z_loss)
    return _head_loss_sums(h, weight, targets, softcap, z_loss)


def _head_loss_sums(h, weight, targets, softcap, z_loss):
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        objective, ce, correct = _HeadLoss.apply(h2, weight, y, softcap, z_loss)
        return LossSums(objective, ce, correct)
    objective, ce, correct, _, _ = _chunked(h2, weight, y, softcap, z_loss, need_grads=False)
    return LossSums(objective, ce, correct)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, z_loss):  # type: ignore[override]
        objective, ce, correct, grad_h, grad_w = _chunked(h, weight, targets, softcap, z_loss, need_grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, correct)
        return objective, ce, correct

    @staticmethod
    def backward(ctx, grad_objective, _grad_ce, _grad_correct):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # The objective is a sum, so the chain rule only scales the gradients found in forward.
        return grad_h * grad_objective.to(grad_h.dtype), grad_w * grad_objective, None, None, None


def _chunked(h, weight, targets, softcap, z_loss, need_grads):
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    n, vocab = h.shape[0], weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS.get(dev, CHUNK_ELEMENTS["default"]) // vocab)
    objective = ce = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    grad_h = grad_w = None
    with torch.autocast(dev, enabled=False):  # dtypes are explicit below
        hc, w = h.to(dtype), weight.to(dtype)  # one cast of the weight for all chunks
        if need_grads:
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            hs, ys = hc[start : start + rows], targets[start : start + rows]
            logits = (hs @ w.T).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            correct = correct + (logits.argmax(-1) == ys).sum()
            logp = torch.log_softmax(logits, dim=-1)
            ce = ce + logp.gather(1, ys[:, None]).sum().neg()
            if z_loss:
                lse = logits[:, 0] - logp[:, 0]  # log-sum-exp of each row, from what is already computed
                objective = objective + z_loss * lse.square().sum()
            if not need_grads:
                continue
            # d(ce)/d(logits) = softmax − one-hot; z-loss adds 2·z·lse·softmax; the soft-cap's tanh scales by 1 − t².
            grad = logp.exp_()
            if z_loss:
                grad.mul_((1 + 2 * z_loss * lse)[:, None])
            grad[torch.arange(len(ys), device=h.device), ys] -= 1
            if softcap:
                grad.mul_(1 - capped.square())
            grad = grad.to(dtype)
            torch.mm(grad, w, out=grad_h[start : start + rows])  # straight into its rows, no temporary
            if dtype == torch.float32:  # accumulated inside the matmul: no (vocab x d) temporary, no extra pass
                grad_w.addmm_(grad.T, hs)
            else:
                grad_w += (grad.T @ hs).float()
    objective = objective + ce
    if need_grads:
        return objective, ce, correct, grad_h.to(h.dtype), grad_w.to(weight.dtype)
    return objective, ce, correct, None, None
