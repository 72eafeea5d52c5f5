"""The transformer: shapes, GPT-2 parameter count, tying, causality, init."""

from __future__ import annotations

import pytest
import torch

from xlab.errors import XLabError
from xlab.models import XLabModel

TINY = dict(n_layer=2, n_head=2, d_model=32, max_len=16)
GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)  # configs/model/gpt.yaml


def test_logits_shape_hparams_device():
    model = XLabModel(100, **TINY)
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100)
    assert model.hparams["max_len"] == 16 and model.hparams["vocab_size"] == 100
    assert model.device == torch.device("cpu")


def test_gpt2_small_has_124m_parameters():
    model = XLabModel(50257, n_layer=12, n_head=12, d_model=768, max_len=1024, **GPT2)
    assert model.num_params() == 124_439_808  # GPT-2 small, tied head counted once


def test_tied_embeddings_share_storage():
    tied = XLabModel(100, **TINY, tie_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = XLabModel(100, **TINY)  # the default: an untied head
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 100 * 32


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = XLabModel(50, **TINY).eval()
    x = torch.randint(0, 50, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 50
    a, b = model(x), model(y)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = XLabModel(1000, n_layer=8, n_head=4, d_model=256, max_len=16)
    normal_std = model.blocks[0].attn.qkv.weight.std().item()
    residual_std = model.blocks[0].attn.proj.weight.std().item()
    assert normal_std == pytest.approx(0.02, rel=0.05)
    assert residual_std == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_flops_per_token_counts_weights_and_attention():
    model = XLabModel(100, **TINY, tie_embeddings=True)
    n = model.num_params(exclude_embeddings=True) + 100 * 32  # the tied head is a matmul all the same
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 16
    untied = XLabModel(100, **TINY)
    assert untied.flops_per_token() == 6 * untied.num_params(exclude_embeddings=True) + 12 * 2 * 32 * 16


def test_bad_shapes_fail_with_a_message():
    with pytest.raises(XLabError, match="must divide"):
        XLabModel(100, n_layer=1, n_head=3, d_model=32, max_len=8)
    with pytest.raises(XLabError, match="unknown model hyperparameter"):
        XLabModel(100, n_layers=2)
    with pytest.raises(ValueError, match="longer than max_len"):
        XLabModel(100, **TINY)(torch.zeros(1, 17, dtype=torch.long))
