"""A plain PyTorch GPT-2 (nanoGPT style), the second peer of benchmarks/train_throughput.py: what a researcher would
write without XLab's fast paths — SDPA with is_causal, materialised logits + F.cross_entropy, fused AdamW.

Its modules carry XLab's names (tok_emb, pos_emb.emb, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc,mlp.proj},
norm_f, lm_head), so `ReferenceGPT.like(xlab_model)` holds the same weights and computes the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.attn = Attention(d_model, n_head, bias)
        self.norm2 = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.mlp = MLP(d_model, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Positions(nn.Module):  # a module of its own only so the key reads pos_emb.emb.weight, as in XLab
    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_len, d_model)


class ReferenceGPT(nn.Module):
    """Pre-LayerNorm GPT-2 with learned positions, a tanh-GELU MLP and the head tied to the token embedding."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, max_len: int,
                 bias: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = Positions(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, bias, eps) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(d_model, eps=eps, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    @classmethod
    def like(cls, model: nn.Module) -> ReferenceGPT:
        """The reference of an XLab GPT-2 block model (learned positions, LayerNorm, GELU, tied), its weights
        copied."""
        c = model.cfg
        plain = (c.pos_emb, c.norm, c.mlp, c.norm_position, c.tie_embeddings, c.n_kv_head in (None, c.n_head),
                 c.qk_norm, c.logit_softcap, c.z_loss, c.d_ff in (None, 4 * c.d_model), c.dropout)
        if plain != ("learned", "layernorm", "gelu", "pre", True, True, False, None, 0.0, True, 0.0):
            raise ValueError("the reference GPT has the GPT-2 block only (model=gpt)")
        ref = cls(model.tok_emb.num_embeddings, c.n_layer, c.n_head, c.d_model, c.max_len, c.bias, c.norm_eps)
        ref.load_state_dict(model.state_dict())
        return ref.to(model.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or with targets the mean cross-entropy (the logits taken in fp32)."""
        x = self.tok_emb(idx) + self.pos_emb.emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
