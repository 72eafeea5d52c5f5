"""The model's config group (configs/model/*.yaml): ModelConfig and its closed choices."""

from __future__ import annotations

from dataclasses import dataclass

from xlab.schema import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    Choice,
    Range,
    Schema,
)


class NormPosition(Choice):
    pre = "pre"  # x + f(norm(x)), a final norm before the head (GPT-2, Llama)
    post = "post"  # norm(x + f(x)) (the original transformer)


class AttnImpl(Choice):
    auto = "auto"  # eager for bf16/fp16 on CPU up to 512 tokens, else sdpa (xlab/models/ops.py)
    sdpa = "sdpa"
    eager = "eager"  # matmul + softmax


class ResidualInit(Choice):
    scaled = "scaled"  # init_std / sqrt(2 * n_layer) (GPT-2)
    zero = "zero"  # every block starts as the identity
    plain = "plain"  # init_std


@dataclass
class ModelConfig(Schema):
    """Decoder-only transformer; see xlab/models/transformer.py. Parts are picked by registry name. The defaults are
    the default recipe, a Llama-style block (RoPE, RMSNorm, no biases, untied head) with a ReLU² MLP (Arcee's block
    in transformers), which beat the GPT-2 block at equal wall-clock in the recipe benchmark (BENCHMARKS.md);
    configs/model/gpt.yaml is GPT-2, configs/model/llama_tiny.yaml Llama."""

    name: str = "transformer"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); None = n_head, 1 = multi-query attention
    # 128, not 256: at the quick run's length (~5 min on 2 CPU cores) the narrower model sees 2.5x the tokens and won
    # on every corpus of the equal-time benchmark (BENCHMARKS.md, recipes); 4x256 is compute-starved there
    d_model: int = 128
    max_len: int = 256  # context length in tokens
    pos_emb: str = "rope"  # learned | rope | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: NormPosition = NormPosition.pre
    # relu2, not swiglu: two matmuls instead of three for the same parameters, ~10% faster steps on a CPU and a lower
    # test bpb at equal time on pydocs and the man pages (BENCHMARKS.md, recipes)
    mlp: str = "relu2"  # gelu | swiglu | relu2
    d_ff: int | None = None  # hidden width of the MLP; None = 4*d_model (gelu, relu2), ~8/3*d_model (swiglu)
    qk_norm: bool = False  # normalise queries and keys per head before attention (and before RoPE)
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0  # embedding, residual and (unless attn_dropout says otherwise) attention dropout
    # attention-probability dropout; None = dropout. On a CPU it costs more than residual dropout (it draws
    # B x H x T x T numbers per layer), but at equal time on small data residual-only dropout scored worse than both
    # (BENCHMARKS.md, recipes)
    attn_dropout: float | None = None
    tie_embeddings: bool = False
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    z_loss: float = 0.0  # coefficient of the mean squared log-partition term added to the training loss
    init_std: float = 0.02
    residual_init: ResidualInit = ResidualInit.scaled  # init of the residual branches' output projections
    attn_impl: AttnImpl = AttnImpl.auto

    LIMITS = {
        "n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "d_model": AT_LEAST_1, "max_len": AT_LEAST_1,
        "n_kv_head": Range(1, note="(or null: n_head)"), "d_ff": Range(1, note="(or null: the MLP's default)"),
        "rope_theta": POSITIVE, "norm_eps": POSITIVE, "dropout": Range(0, 1, hi_open=True),
        "attn_dropout": Range(0, 1, hi_open=True, note="(or null: dropout)"),
        "logit_softcap": Range(0, lo_open=True, note="(or null to disable)"), "z_loss": NON_NEGATIVE,
        "init_std": POSITIVE,
    }
