"""Each architecture knob changes the computation the way it should."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_loss_sums
from torch import nn

from xlab.errors import XLabError
from xlab.models import XLabModel
from xlab.models.config import ModelConfig
from xlab.models.transformer import RotaryPositions, default_d_ff

BASE = dict(n_layer=2, n_head=4, d_model=32, max_len=16)
GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)  # the knobs' baseline


def model(**knobs) -> XLabModel:
    torch.manual_seed(0)
    return XLabModel(50, **{**BASE, **GPT2, **knobs})


def test_rope_scores_depend_only_on_relative_offset():
    rope = RotaryPositions(ModelConfig(**BASE, pos_emb="rope"))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm, _ = rope.rotate(q, q, rope.prepare(torch.tensor([m])))
        _, kn = rope.rotate(k, k, rope.prepare(torch.tensor([n])))
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5) == pytest.approx(score(2, 0), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert model(pos_emb="rope").pos_emb.state_dict() == {}  # no learned position table


def test_learned_positions_and_none():
    assert model().pos_emb.emb.weight.shape == (16, 32)
    nope = model(pos_emb="none")
    assert sum(p.numel() for p in nope.pos_emb.parameters()) == 0
    x = torch.randint(0, 50, (1, 16))
    assert torch.isfinite(nope(x)).all()


def test_gqa_shares_keys_and_values_across_head_groups():
    m = model(n_kv_head=2, pos_emb="rope").eval()
    attn = m.blocks[0].attn
    hd = 8
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * hd, 32)
    x = torch.randn(2, 16, 32)
    positions = torch.arange(16)
    q, k, v = attn.qkv(x).split([4 * hd, 2 * hd, 2 * hd], dim=-1)
    q, k, v = (t.view(2, 16, -1, hd).transpose(1, 2) for t in (q, k, v))
    q, k = m.pos_emb.rotate(q, k, m.pos_emb.prepare(positions))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query heads 0,1 → kv head 0, ...
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn.proj(ref.transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(attn(x, m.pos_emb, m.pos_emb.prepare(positions)), expected, atol=1e-5)
    mqa = model(n_kv_head=1).blocks[0].attn.qkv.weight
    assert mqa.shape == ((4 + 2) * hd, 32)


def test_norm_kinds():
    assert isinstance(model(norm="rmsnorm").blocks[0].norm1, nn.RMSNorm)
    assert isinstance(model().blocks[0].norm1, nn.LayerNorm)
    assert model(norm="layernorm", bias=False).blocks[0].norm1.bias is None


def test_post_norm_normalises_each_block_output():
    m = model(norm_position="post").eval()
    assert isinstance(m.norm_f, nn.Identity)
    x = torch.randn(2, 16, 32) * 5
    out = m.blocks[0](x, m.pos_emb, m.pos_emb.prepare(torch.arange(16)))
    assert torch.allclose(out.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)


def test_mlp_kinds_and_default_widths():
    assert default_d_ff(ModelConfig(d_model=768, mlp="swiglu")) == 2048
    assert default_d_ff(ModelConfig(d_model=100, mlp="swiglu")) % 64 == 0
    assert default_d_ff(ModelConfig(d_model=32, mlp="gelu")) == 128
    swiglu = model(mlp="swiglu").blocks[0].mlp
    assert swiglu.fc.weight.shape == (2 * 128, 32)  # gate and up fused (32 * 8/3 rounded up to 64 → 128)
    relu2 = model(mlp="relu2").blocks[0].mlp
    x = torch.randn(4, 32)
    assert torch.allclose(relu2(x), relu2.proj(torch.relu(relu2.fc(x)) ** 2))
    gelu = model(mlp="gelu", d_ff=48).blocks[0].mlp
    assert gelu.fc.weight.shape == (48, 32)


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    for qk_norm, invariant in ((True, True), (False, False)):
        m = model(qk_norm=qk_norm, pos_emb="rope").eval()
        attn = m.blocks[0].attn
        x, pos = torch.randn(1, 16, 32), m.pos_emb.prepare(torch.arange(16))
        before = attn(x, m.pos_emb, pos)
        with torch.no_grad():
            attn.qkv.weight[:64] *= 10  # scale queries and keys
        after = attn(x, m.pos_emb, pos)
        assert torch.allclose(before, after, atol=1e-4) == invariant


def test_bias_false_removes_every_bias():
    names = [n for n, _ in model(bias=False, norm="rmsnorm").named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert any(n.endswith("bias") for n, _ in model().named_parameters())


def test_dropout_only_in_training():
    m = model(dropout=0.5)
    x = torch.randint(0, 50, (2, 16))
    m.train()
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_attn_dropout_separates_attention_from_residual_dropout():
    """attn_dropout=0 keeps the attention probabilities whole while dropout still drops residual activations;
    attn_dropout=None (the default) means the attention drops at model.dropout, as before the key existed."""
    x = torch.randn(2, 16, 32)
    for attn_dropout, attention_random in ((0.0, False), (None, True), (0.5, True)):
        m = model(dropout=0.5, attn_dropout=attn_dropout)
        attn = m.blocks[0].attn.train()
        rot = m.pos_emb.prepare(torch.arange(16))
        assert torch.equal(attn(x, m.pos_emb, rot), attn(x, m.pos_emb, rot)) is not attention_random
    m = model(dropout=0.5, attn_dropout=0.0).train()
    tokens = torch.randint(0, 50, (2, 16))
    assert not torch.equal(m(tokens), m(tokens))  # residual and embedding dropout stay on
    with pytest.raises(XLabError, match=r"model.attn_dropout=1.0 must be in \[0, 1\)"):
        model(attn_dropout=1.0)


def test_untied_head_has_its_own_weight():
    m = model(tie_embeddings=False)
    assert m.lm_head.weight is not m.tok_emb.weight


def test_logit_softcap_bounds_logits():
    m = model(logit_softcap=2.0, init_std=1.0)
    logits = m(torch.randint(0, 50, (2, 16)))
    assert logits.abs().max() <= 2.0  # tanh saturates to exactly the cap in fp32
    assert model(init_std=1.0)(torch.randint(0, 50, (2, 16))).abs().max() > 2.0


def test_z_loss_adds_the_expected_term():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    objective, ce = lm_loss_sums(logits, targets, z_loss=1e-2)
    plain, ce2 = lm_loss_sums(logits, targets)
    assert torch.equal(ce, ce2) and torch.equal(plain, ce)
    expected = ce + 1e-2 * torch.logsumexp(logits.flatten(0, 1), -1).square().sum()
    assert torch.allclose(objective, expected)


def test_init_std_and_residual_init():
    torch.manual_seed(0)
    big = XLabModel(1000, n_layer=8, n_head=4, d_model=256, max_len=16, init_std=0.05, residual_init="plain")
    assert big.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    zero = model(residual_init="zero")
    assert all(not b.attn.proj.weight.any() and not b.mlp.proj.weight.any() for b in zero.blocks)
    assert zero.blocks[0].attn.qkv.weight.any()


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (dict(n_kv_head=3), "n_kv_head=3 must divide"),
        (dict(pos_emb="rope", n_head=32, d_model=32), "even head dim"),
        (dict(norm_position="middle"), "valid: pre, post"),
        (dict(mlp="relu3"), "unknown mlp 'relu3'; valid: gelu, relu2, swiglu"),
        (dict(pos_emb="alibi"), "valid: learned, none, rope"),
        (dict(residual_init="tiny"), "valid: scaled, zero, plain"),
        (dict(logit_softcap=0.0), "logit_softcap=0.0 must be > 0"),
    ],
)
def test_invalid_knobs_fail_with_one_line(knobs, message):
    with pytest.raises(XLabError, match=message.replace("(", r"\(")):
        model(**knobs)
