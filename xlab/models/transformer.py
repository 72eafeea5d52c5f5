"""A decoder-only transformer language model, GPT-2 style by default, in plain PyTorch.

Read top to bottom: parts (norms, positional embeddings, attention, MLP) → Block → XLabModel. Each swappable part
is chosen by name from a registry, so `model.norm=...` in a config maps to one class here. The model knows nothing
of distribution, logging or checkpoint formats; those live in xlab/trainer.py and xlab/checkpoint.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from xlab.config import ModelConfig
from xlab.errors import XLabError
from xlab.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")
POS_EMBS: Registry[type[nn.Module]] = Registry("positional embedding")
MLPS: Registry[type[nn.Module]] = Registry("mlp")


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__(dim, eps=cfg.norm_eps, bias=cfg.bias)


@POS_EMBS.register("learned")
class LearnedPositions(nn.Module):
    """GPT-2's absolute positions: one learned vector per position, added to the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.max_len, cfg.d_model)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.emb(positions)


@POS_EMBS.register("none")
class NoPositions(nn.Module):
    """No explicit positions (NoPE): causal attention alone breaks the symmetry."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_proj = True  # gets the scaled init, see XLabModel._init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        # SDPA picks the fastest kernel (flash / memory-efficient / math) for the device and dtype.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


@MLPS.register("gelu")
class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's tanh approximation


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = NORMS.get(cfg.norm)
        self.norm1 = norm(cfg.d_model, cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = norm(cfg.d_model, cfg)
        self.mlp = MLPS.get(cfg.mlp)(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


def check_model_config(cfg: ModelConfig) -> None:
    """Fail at start-up, with one line, on shapes that cannot work."""
    for key in ("n_layer", "n_head", "d_model", "max_len"):
        if getattr(cfg, key) < 1:
            raise XLabError(f"model.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.d_model % cfg.n_head:
        raise XLabError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise XLabError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    NORMS.get(cfg.norm), POS_EMBS.get(cfg.pos_emb), MLPS.get(cfg.mlp)  # unknown part names fail here


class XLabModel(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, **hparams: Any) -> None:
        super().__init__()
        known = {f.name for f in fields(ModelConfig)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise XLabError(f"unknown model hyperparameter(s) {unknown}; valid: {', '.join(sorted(known))}")
        cfg = ModelConfig(**hparams)
        check_model_config(cfg)
        self.cfg = cfg
        self.hparams: dict[str, Any] = {**asdict(cfg), "vocab_size": vocab_size}

        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = POS_EMBS.get(cfg.pos_emb)(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = NORMS.get(cfg.norm)(cfg.d_model, cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            # Input and output embeddings share one matrix (GPT-2): fewer parameters, and rare tokens' output
            # vectors get the gradient of every time the token is read.
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False):
                # Each block adds two residual branches; scale their output projections so the residual stream's
                # variance does not grow with depth (GPT-2 paper, section 2.3).
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for m in (self.tok_emb, self.pos_emb) for p in m.parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N for the weights plus 12·L·d·T for attention scores
        (PaLM appendix B). N excludes embeddings, which are lookups, but includes the output head."""
        t = seq_len or self.cfg.max_len
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.lm_head.weight.numel()  # the head is a real matmul even when tied to the lookup table
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.d_model * t

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"sequence of {t} tokens is longer than max_len={self.cfg.max_len}")
        positions = torch.arange(t, device=input_ids.device)
        x = self.drop(self.pos_emb(self.tok_emb(input_ids), positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))

    @classmethod
    def load_from_checkpoint(cls, path: str, map_location: str | torch.device | None = None) -> XLabModel:
        """Build the model from a checkpoint or export directory (config.yaml + model.safetensors)."""
        from xlab.checkpoint import load_model

        return load_model(path, map_location=map_location)
