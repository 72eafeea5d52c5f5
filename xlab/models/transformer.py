"""A decoder-only transformer language model in plain PyTorch: a Llama-style block by default (RoPE, RMSNorm,
ReLU² MLP), Llama's with model=llama_tiny, GPT-2's with model=gpt.

Read top to bottom: norms, positional schemes, attention, MLPs → Block → XLabModel. Each swappable part is chosen
by name from a registry, so `model.norm=rmsnorm` in a config maps to one class here, and the presets in
configs/model/ (GPT-2, Llama, "modern") are just different choices. The model knows nothing of distribution,
logging or file formats (xlab/training/, xlab/checkpoint/, xlab/models/hf.py): load_from_checkpoint takes what a
`Checkpoint` reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from xlab.checkpoint.read import Checkpoint
from xlab.errors import XLabError
from xlab.models.config import ModelConfig
from xlab.models.loss import LossSums, head_loss_sums
from xlab.models.ops import Dropout, attention_dtype, eager_attention, rms_norm, use_eager_attention
from xlab.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")
POS_EMBS: Registry[type[nn.Module]] = Registry("positional embedding")
MLPS: Registry[type[nn.Module]] = Registry("mlp")


# --- norms -------------------------------------------------------------------------------------------------------

@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__(dim, eps=cfg.norm_eps, bias=cfg.bias)


@NORMS.register("rmsnorm")
class RMSNorm(nn.RMSNorm):
    """Scale-only normalisation (Llama): cheaper than LayerNorm and as good in practice."""

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__(dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return rms_norm(x, self.weight, self.eps)  # PyTorch has no fused RMSNorm backward on CPU
        return super().forward(x)


# --- positional schemes: either added to the embeddings, or rotating queries and keys -----------------------------

class Positions(nn.Module):
    """No explicit positions (NoPE): causal attention alone tells tokens apart. The base of the other schemes.

    prepare(positions) runs once per forward; what it returns is handed to rotate() in every layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, positions: torch.Tensor) -> Any:
        return None

    def rotate(self, q: torch.Tensor, k: torch.Tensor, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


POS_EMBS.register("none")(Positions)


@POS_EMBS.register("learned")
class LearnedPositions(Positions):
    """GPT-2's absolute positions: one learned vector per position, added to the token embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.emb = nn.Embedding(cfg.max_len, cfg.d_model)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.emb(positions)


@POS_EMBS.register("rope")
class RotaryPositions(Positions):
    """Rotary embeddings (RoFormer), in the half-split layout Llama and transformers use: the query-key dot
    product then depends only on the relative offset of the two positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        head_dim = cfg.d_model // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived from the config, not a weight

    def prepare(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position's angles, (T, hd) or (B, 1, T, hd) for per-row positions. The sign of
        rotate-half is folded into sin: x·cos + rotate_half(x)·sin = x·cos + roll(x, hd/2)·[-sin, sin]."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # (T, hd/2) or (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        if positions.dim() == 2:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return cos, sin

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = (a.to(q.dtype) for a in prepared)
        half = q.shape[-1] // 2
        return torch.addcmul(q * cos, q.roll(half, -1), sin), torch.addcmul(k * cos, k.roll(half, -1), sin)


# --- attention ---------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped key/value heads (GQA/MQA) and QK-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.attn_impl = cfg.attn_impl
        # One matmul for queries, keys and values; keys/values have n_kv_head heads each.
        self.qkv = nn.Linear(cfg.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_proj = True  # see XLabModel._init_weights
        norm = NORMS.get(cfg.norm)
        self.q_norm = norm(self.head_dim, cfg) if cfg.qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim, cfg) if cfg.qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, pos: Positions, rot: Any,
        cache: KVCache | StaticKVCache | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(k, "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(v, "b t (h d) -> b h t d", d=self.head_dim)
        q, k = pos.rotate(self.q_norm(q), self.k_norm(k), rot)
        dtype = attention_dtype(q.dtype, q.device)  # fp32 where the CPU's bf16 matmuls are slow (cache included)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if cache is not None:  # attend to every cached key as well as the new ones
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        if use_eager_attention(self.attn_impl, q, causal_from_start=cache is None and mask is None):
            y = eager_attention(q, k, v, mask, dropout)
        else:
            # SDPA picks the fastest kernel for the device and dtype; enable_gqa lets query head i read kv head
            # i // (n_head / n_kv_head) without materialising repeated keys and values.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,  # no mask = plain causal attention from position 0
                dropout_p=dropout, enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.proj(rearrange(y.to(x.dtype), "b h t d -> b t (h d)"))


class KVCache:
    """Keys and values of the tokens seen so far, per layer, preallocated for max_len positions, so decoding
    computes attention for one new token per step instead of re-running the whole sequence."""

    def __init__(self, model: XLabModel, batch_size: int) -> None:
        c = model.cfg
        self.shape = (batch_size, c.n_kv_head or c.n_head, c.max_len, c.d_model // c.n_head)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.n_layer = c.n_layer
        self.length = 0  # positions filled (the same for every row)
        self.max_len = c.max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.k) <= layer:  # allocated on first use, in the dtype attention runs in (autocast or not)
            self.k.append(k.new_zeros(self.shape))
            self.v.append(v.new_zeros(self.shape))
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        if layer == self.n_layer - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows (beam search: the beams that survive a step)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class StaticKVCache:
    """A KV cache of fixed shape (batch, heads, size, head_dim) whose state lives in tensors only: the next slot to
    write, each row's next position and which slots hold real tokens. A forward over it has the same shapes at
    every decoding step, so torch.compile builds it once per (batch, size) and CUDA graphs can replay it.

    Every chunk attends over all `size` slots through a mask (filled, real and not after the query), so unfilled
    slots cost a little compute but no recompilation. rewind(n) forgets the last n tokens (speculative decoding)."""

    def __init__(self, model: XLabModel, batch_size: int, size: int, dtype: torch.dtype | None = None) -> None:
        c, device = model.cfg, model.device
        dtype = dtype or attention_dtype(model.tok_emb.weight.dtype, device)  # the dtype the keys arrive in
        shape = (batch_size, c.n_kv_head or c.n_head, size, c.d_model // c.n_head)
        self.size = size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layer)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the next slot to write
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # each row's next position
        self.real = torch.zeros(batch_size, size, dtype=torch.bool, device=device)  # slots holding real tokens
        self.slots = self.slot  # the slots of the chunk being run, set by advance()
        for t in (*self.k, *self.v, self.slot, self.pos, self.real):
            torch._dynamo.mark_static_address(t)  # CUDA graphs may replay over these buffers in place

    def advance(self, t: int, chunk_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the next t slots for a chunk of t tokens (chunk_mask (B, t): 0 = left padding); returns their
        positions (B, t) and the attention mask (B, 1, t, size)."""
        offsets = torch.arange(t, device=self.slot.device)
        self.slots = self.slot + offsets
        if chunk_mask is None:
            positions = self.pos[:, None] + offsets
            self.real.index_fill_(1, self.slots, True)
            self.pos.add_(t)
        else:
            keep = chunk_mask.bool()
            positions = self.pos[:, None] + (keep.long().cumsum(-1) - 1).clamp(min=0)
            self.real.index_copy_(1, self.slots, keep)
            self.pos.add_(keep.long().sum(-1))
        self.slot.add_(t)
        columns = torch.arange(self.size, device=self.slot.device)
        visible = columns[None] <= self.slots[:, None]  # (t, size): causal
        own = columns[None] == self.slots[:, None]  # a padding query sees itself: no row of the mask is empty
        return positions, ((self.real[:, None] & visible[None]) | own[None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def rewind(self, n: int) -> None:
        """Forget the last n chunk tokens (all of them real): later chunks overwrite their slots."""
        self.slot.sub_(n)
        self.pos.sub_(n)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate batch rows in place (beam search), so the buffers keep their addresses."""
        for t in (*self.k, *self.v, self.pos, self.real):
            t.copy_(t.index_select(0, rows))


# --- MLPs --------------------------------------------------------------------------------------------------------

def default_d_ff(cfg: ModelConfig) -> int:
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.mlp == "swiglu":  # 2/3 of 4*d keeps the parameter count of a 4*d MLP with three matrices
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


@MLPS.register("gelu")
class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, default_d_ff(cfg), bias=cfg.bias)
        self.proj = nn.Linear(default_d_ff(cfg), cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's tanh approximation


@MLPS.register("relu2")
class ReluSquaredMLP(GeluMLP):
    """Squared ReLU (Primer): sparse activations, a little better than GELU at small scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


@MLPS.register("swiglu")
class SwiGLUMLP(nn.Module):
    """silu(gate(x)) * up(x) → down (Shazeer 2020; Llama). Gate and up share one matmul: fc's first half is
    the gate, its second half the up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_ff = default_d_ff(cfg)
        self.fc = nn.Linear(cfg.d_model, 2 * d_ff, bias=cfg.bias)
        self.proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


# --- the model ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Residual block. Pre-norm: x + f(norm(x)), stable at depth. Post-norm: norm(x + f(x)), the original."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = NORMS.get(cfg.norm)
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = norm(cfg.d_model, cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = norm(cfg.d_model, cfg)
        self.mlp = MLPS.get(cfg.mlp)(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, pos: Positions, rot: Any,
        cache: KVCache | StaticKVCache | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), pos, rot, cache, mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, pos, rot, cache, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


def check_model_config(cfg: ModelConfig) -> None:
    """Fail at start-up, with one line, on shapes and choices that cannot work (each number's own range is checked
    by the schema, xlab/schema.py)."""
    if cfg.d_model % cfg.n_head:
        raise XLabError(f"model.n_head={cfg.n_head} must divide model.d_model={cfg.d_model}")
    n_kv = cfg.n_kv_head or cfg.n_head
    if n_kv < 1 or cfg.n_head % n_kv:
        raise XLabError(f"model.n_kv_head={cfg.n_kv_head} must divide model.n_head={cfg.n_head}")
    if cfg.pos_emb == "rope" and (cfg.d_model // cfg.n_head) % 2:
        raise XLabError(f"model.pos_emb=rope needs an even head dim, got d_model/n_head={cfg.d_model // cfg.n_head}")
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
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        for i, block in enumerate(self.blocks):
            block.attn.layer_idx = i  # its slot in a KVCache
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.norm_f = NORMS.get(cfg.norm)(cfg.d_model, cfg) if cfg.norm_position == "pre" else nn.Identity()
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
                if self.cfg.residual_init == "zero":
                    # Each block starts as the identity; training grows the branches (modded-nanoGPT, ReZero).
                    std = 0.0
                elif self.cfg.residual_init == "scaled":
                    # Each block adds two residual branches; scale their output projections so the residual
                    # stream's variance does not grow with depth (GPT-2 paper, section 2.3).
                    std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std) if std > 0 else nn.init.zeros_(module.weight)
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

    def set_dropout(self, p: float) -> None:
        """Change model.dropout of a built model (embedding, residual and, unless attn_dropout is set, attention
        dropout): the small-data rule decides it after a time budget's probe (xlab/training/trainer.py)."""
        self.cfg.dropout = self.hparams["dropout"] = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention) and self.cfg.attn_dropout is None:
                module.dropout = p

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for m in (self.tok_emb, self.pos_emb) for p in m.parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N for the weights plus 12·L·d·T for attention scores
        (PaLM appendix B). N excludes embedding lookups but includes the output head."""
        t = seq_len or self.cfg.max_len
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings:
            n += self.lm_head.weight.numel()  # the head is a real matmul even when tied to the lookup table
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.d_model * t

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | StaticKVCache | None = None,
        attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
    ) -> torch.Tensor | LossSums:
        """Logits for every input position, or with `targets` (B, T) the summed loss and accuracy against them
        (LossSums; computed without materialising the logits, see xlab/models/loss.py).

        cache: a KVCache; the input continues the cached tokens and is added to the cache (prefill, then one token
        per step). attention_mask: (B, cached + T) with 0 for padding, for batches of left-padded prompts; each
        row's positions then count its real tokens only, so a padded row computes what it would alone.
        With a StaticKVCache, attention_mask covers the new tokens only (B, T): the cache remembers the rest.
        """
        h = self.hidden(input_ids, cache, attention_mask)
        if targets is not None:
            return head_loss_sums(h, self.lm_head.weight, targets, self.cfg.logit_softcap, self.cfg.z_loss)
        return self.head(h)

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | StaticKVCache | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final norm's output (B, T, d_model), what the head reads (forward's arguments): scoring only some
        positions (lm-eval's continuations) runs `head` on those rows alone."""
        if isinstance(cache, StaticKVCache):
            positions, mask = cache.advance(input_ids.shape[1], attention_mask)
        else:
            positions, mask = self._positions_and_mask(input_ids, cache, attention_mask)
        x = self.drop(self.pos_emb.embed(self.tok_emb(input_ids), positions))
        rot = self.pos_emb.prepare(positions)
        for block in self.blocks:
            x = block(x, self.pos_emb, rot, cache, mask)
        return self.norm_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (..., d_model)."""
        logits = self.lm_head(h)
        if self.cfg.logit_softcap:
            # Smoothly bound logits to (-cap, cap) (Gemma 2): keeps early training from over-confident spikes.
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    def _positions_and_mask(
        self, input_ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (T,) or (B, T) of the new tokens and the attention mask (None = causal from position 0)."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + t > self.cfg.max_len:
            raise ValueError(f"sequence of {past + t} tokens is longer than max_len={self.cfg.max_len}")
        if attention_mask is None:
            positions = torch.arange(past, past + t, device=input_ids.device)
            if past == 0:
                return positions, None
            # tokens after cached ones: causal within the new chunk, all of the past
            return positions, torch.ones(t, past + t, dtype=torch.bool, device=input_ids.device).tril(past)
        keep = attention_mask.bool()
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        causal = torch.ones(t, past + t, dtype=torch.bool, device=input_ids.device).tril(past)
        mask = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, T, past + T)
        arange = torch.arange(past + t, device=input_ids.device)
        own = arange == arange[past:, None]
        return positions, mask | own  # a padding query sees itself: no row of the mask is empty (NaN-free)

    @classmethod
    def load_from_checkpoint(cls, path: str | Path | Checkpoint,
                             map_location: str | torch.device | None = None) -> XLabModel:
        """Build the model from a checkpoint or export directory (config.yaml + model.safetensors)."""
        ckpt = Checkpoint.of(path)
        hparams = asdict(ckpt.section("model", ModelConfig))  # keys it lacks (older checkpoints): defaults
        model = cls(vocab_size=ckpt.vocab_rows(), **hparams)
        device = str(map_location) if map_location is not None else "cpu"
        ckpt.weights_into(model, device)
        return model.to(device)


# `model.name` in configs/model/*.yaml: the model classes a config can pick.
MODELS: Registry[type[XLabModel]] = Registry("model")
MODELS.register("transformer")(XLabModel)
