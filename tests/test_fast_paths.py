"""The speed-ups of the training step compute what the plain code computes: the fused chunked head + loss, the
eager attention path, dropout's CPU path, and the allocator setting (which must actually stop the page faults it is
there for)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_loss_sums

from xlab.errors import XLabError
from xlab.models import XLabModel
from xlab.models import loss as loss_module
from xlab.models.loss import head_loss_sums
from xlab.models.ops import Dropout, eager_attention, fast_dropout, rms_norm


@pytest.fixture
def small_chunks(monkeypatch):
    """7 rows per chunk of a 50-token vocabulary: a batch of 24 tokens spans 4 chunks, the last one ragged."""
    monkeypatch.setitem(loss_module.CHUNK_ELEMENTS, "cpu", 50 * 7)


def reference(model, x, y):
    logits = model(x)
    objective, ce = lm_loss_sums(logits, y, model.cfg.z_loss)
    return objective, ce, (logits.argmax(-1) == y).sum(), logits


@pytest.mark.parametrize("knobs", [{}, {"logit_softcap": 3.0}, {"z_loss": 1e-2}, {"tie_embeddings": False},
                                   {"logit_softcap": 2.0, "z_loss": 0.1, "tie_embeddings": False}])
def test_fused_head_loss_equals_materialised_logits(small_chunks, knobs):
    torch.manual_seed(0)
    model = XLabModel(50, n_layer=1, n_head=2, d_model=16, max_len=8, init_std=0.5, **knobs)
    x, y = torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        y[:, ::2] = model(x).argmax(-1)[:, ::2]  # half the targets are the model's predictions
    objective, ce, correct, _ = reference(model, x, y)
    objective.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    out = model(x, targets=y)
    assert torch.allclose(out.objective, objective.detach(), rtol=1e-5)
    assert torch.allclose(out.ce, ce.detach(), rtol=1e-5)
    assert int(out.correct) == int(correct) >= 12
    out.objective.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name
    with torch.no_grad():  # the evaluation path: same sums, no gradients computed
        again = model(x, targets=y)
    assert again.objective.grad_fn is None and torch.equal(again.ce, out.ce) and int(again.correct) == int(correct)


def test_fused_head_loss_under_bf16_autocast(small_chunks):
    torch.manual_seed(0)
    model = XLabModel(50, n_layer=1, n_head=2, d_model=16, max_len=8, init_std=0.5)
    x, y = torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ce, _, logits = reference(model, x, y)
        out = model(x, targets=y)
    assert logits.dtype == torch.bfloat16 and out.ce.dtype == torch.float32
    assert abs(out.ce.item() - ce.item()) / ce.item() < 1e-2  # both round h and the weight to bf16
    out.objective.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_head_loss_only_objective_is_differentiable():
    torch.manual_seed(0)
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    out = head_loss_sums(h, w, y)
    assert out.objective.requires_grad and not out.ce.requires_grad and not out.correct.requires_grad
    (3 * out.objective).backward()  # the upstream gradient scales both precomputed gradients
    gh, gw = torch.autograd.grad(3 * F.cross_entropy(h @ w.T, y, reduction="sum"), (h, w))
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)


@pytest.mark.parametrize(("n_head", "n_kv_head"), [(4, 4), (4, 2), (4, 1)])
def test_eager_attention_equals_sdpa(n_head, n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, n_head, 6, 8)
    k, v = torch.randn(2, n_kv_head, 6, 8), torch.randn(2, n_kv_head, 6, 8)
    gqa = n_kv_head != n_head
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert torch.allclose(eager_attention(q, k, v, None, 0.0), causal, atol=1e-6)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)  # every query sees at least itself
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert torch.allclose(eager_attention(q, k, v, mask, 0.0), masked, atol=1e-6)
    # queries after cached keys: the causal mask is offset to the bottom right
    late = F.scaled_dot_product_attention(q[:, :, 4:], k, v, attn_mask=torch.ones(2, 6, dtype=torch.bool).tril(4),
                                          enable_gqa=gqa)
    assert torch.allclose(eager_attention(q[:, :, 4:], k, v, None, 0.0), late, atol=1e-6)


def test_attn_impls_train_the_same_model():
    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    grads = {}
    for impl in ("sdpa", "eager", "auto"):
        torch.manual_seed(1)
        model = XLabModel(50, n_layer=2, n_head=4, n_kv_head=2, pos_emb="rope", d_model=16, max_len=8,
                          attn_impl=impl)
        model(x, targets=y).objective.backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["sdpa"], grads["eager"], atol=1e-5)
    assert torch.allclose(grads["sdpa"], grads["auto"], atol=1e-5)


def test_auto_attention_is_eager_only_for_bf16_on_cpu_at_short_context(monkeypatch):
    import xlab.models.transformer as transformer

    calls = []
    monkeypatch.setattr(transformer, "eager_attention", lambda *a: calls.append(a[0].dtype) or eager_attention(*a))
    model = XLabModel(50, n_layer=1, n_head=2, d_model=16, max_len=600)
    model(torch.randint(0, 50, (1, 8)), targets=torch.randint(0, 50, (1, 8)))  # fp32: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 50, (1, 8)), targets=torch.randint(0, 50, (1, 8)))  # bf16: eager
        model(torch.randint(0, 50, (1, 513)), targets=torch.randint(0, 50, (1, 513)))  # past 512 tokens: SDPA
    assert calls == [torch.bfloat16]


def test_bf16_attention_runs_in_fp32_where_the_cpus_bf16_matmuls_are_slow(monkeypatch):
    """A bf16 model (cast for decoding, not autocast) attends in fp32 on a CPU without fast bf16: its static cache
    holds fp32 keys, its logits stay those of bf16 weights, and the cached step still gives the uncached logits."""
    from xlab.models import ops
    from xlab.models.transformer import StaticKVCache

    torch.manual_seed(0)
    model = XLabModel(64, n_layer=2, n_head=2, d_model=32, max_len=16).eval()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        exact = model(x).float()
        model.to(torch.bfloat16)
        for slow in (False, True):
            monkeypatch.setattr(ops, "CPU_BF16_IS_SLOW", slow)
            attn = torch.float32 if slow else torch.bfloat16
            assert ops.attention_dtype(torch.bfloat16, torch.device("cpu")) == attn
            with torch.autocast("cpu", dtype=torch.bfloat16):  # training's autocast keeps its own choice
                assert ops.attention_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
            cache = StaticKVCache(model, 2, 16)
            assert cache.k[0].dtype == attn
            logits = model(x)
            assert logits.dtype == torch.bfloat16  # the head and every weight matmul stay bf16
            assert (logits.float() - exact).abs().max() < 0.05
            model(x[:, :6], cache)
            step = model(x[:, 6:7], cache)[:, -1].float()
            assert (step - model(x[:, :7])[:, -1].float()).abs().max() < 0.05, slow


def test_bad_attn_impl_is_refused():
    with pytest.raises(XLabError, match=r"model.attn_impl='flash' is not valid; valid: auto, sdpa, eager"):
        XLabModel(50, n_layer=1, n_head=2, d_model=16, attn_impl="flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch(dtype):
    """Values and both gradients; a bf16 input (as from a linear under autocast) is normalised in fp32."""
    torch.manual_seed(0)
    x0, w0, grad = (torch.randn(3, 5, 16) * 3).to(dtype), torch.randn(16), torch.randn(3, 5, 16)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    expected = F.rms_norm(x.float(), (16,), w, 1e-5)
    expected.backward(grad)
    x2, w2 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = rms_norm(x2, w2, 1e-5)
    y.backward(grad)
    assert y.dtype == torch.float32 and x2.grad.dtype == dtype
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(w2.grad, w.grad, atol=1e-4)
    assert torch.allclose(x2.grad.float(), x.grad.float(), atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(("p", "dtype"), [(0.1, torch.bfloat16), (0.5, torch.float32), (0.03, torch.float32)])
def test_fast_dropout_is_dropout(p, dtype):
    """As F.dropout: a fraction p zeroed (within 5 binomial standard deviations of 1M draws), the rest scaled by
    1/(1-p) in x's dtype, the gradient through the same mask, a new mask each call, and the
    masks reproduced by the seed."""
    x = (torch.rand(1000, 1000) + 0.5).to(dtype).requires_grad_()
    torch.manual_seed(0)
    y = fast_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5, dropped
    kept, scale = y != 0, torch.tensor(1 / (1 - p), dtype=dtype)  # the scale in x's dtype, as F.dropout's
    assert y.dtype == dtype and torch.equal(y[kept], x.detach()[kept] * scale)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad * (kept * scale))
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, p) != 0, kept)
    assert not torch.equal(fast_dropout(x, p) != 0, kept)


def test_dropout_module_takes_the_fast_path_in_training_only():
    module, x = Dropout(0.25), torch.rand(64, 64) + 0.5
    assert torch.equal(module.eval()(x), x)
    torch.manual_seed(1)
    y = module.train()(x)
    torch.manual_seed(1)
    assert torch.equal(y, fast_dropout(x, 0.25)) and 0.15 < (y == 0).float().mean() < 0.35
    module.p = 0.0
    assert torch.equal(module(x), x)


ALLOCATE = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from xlab.device import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()
t = torch.ones(64 << 20, dtype=torch.uint8)
held = libc.mallinfo2()
del t
print(held.hblkhd >> 20, libc.mallinfo2().arena >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_serves_big_tensors_from_the_kept_heap():
    """glibc by default maps a 64 MB tensor on its own (and unmaps it on free, so the next one faults its pages in
    again); with keep_freed_memory it comes from the heap, and the heap keeps the memory after the free."""
    def mallinfo(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True)
        mapped_mb, heap_mb = out.stdout.split()
        return int(mapped_mb), int(heap_mb)

    mapped, _ = mallinfo("plain")
    assert mapped >= 64
    mapped, heap = mallinfo("keep")
    assert mapped < 64 and heap >= 64
