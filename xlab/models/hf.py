"""Hugging Face transformers interop: the state-dict adapter between XLab and GPT2LMHeadModel, LlamaForCausalLM
and Qwen3ForCausalLM, and the export/import built on it.

Only architectures with an exact transformers equivalent are converted; anything else is refused with the knob
that has no equivalent. transformers is imported lazily (it is slow to import and only needed here).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from xlab.checkpoint.layout import TOKENIZER, check_links
from xlab.checkpoint.read import Checkpoint
from xlab.data.config import TokenizerConfig
from xlab.data.tokenizer import load_tokenizer
from xlab.errors import XLabError, check_writable_dir
from xlab.models.config import ModelConfig
from xlab.models.transformer import XLabModel, default_d_ff

# What each transformers family requires of an XLab model config (knob, required value).
_COMMON = [("norm_position", "pre"), ("logit_softcap", None)]
REQUIREMENTS: dict[str, list[tuple[str, Any]]] = {
    "gpt2": [("pos_emb", "learned"), ("norm", "layernorm"), ("mlp", "gelu"), ("bias", True),
             ("tie_embeddings", True), ("qk_norm", False), ("n_kv_head", None), *_COMMON],
    "llama": [("pos_emb", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("bias", False), ("qk_norm", False),
              *_COMMON],
    "qwen3": [("pos_emb", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("bias", False), ("qk_norm", True),
              *_COMMON],
    # Arcee (AFM): Llama with a ReLU² MLP (up → relu² → down), the MLP of XLab's `model.mlp=relu2`
    "arcee": [("pos_emb", "rope"), ("norm", "rmsnorm"), ("mlp", "relu2"), ("bias", False), ("qk_norm", False),
              *_COMMON],
}
HF_ACT = {"llama": "silu", "qwen3": "silu", "arcee": "relu2"}  # the MLP activation each Llama-like family needs
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "arcee": "ArceeForCausalLM"}


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family that computes exactly what `cfg` does, or a one-line error naming the knob."""
    candidate = "gpt2" if cfg.pos_emb == "learned" else (
        "qwen3" if cfg.qk_norm else ("arcee" if cfg.mlp == "relu2" else "llama"))
    cfg_dict = asdict(cfg)
    if cfg.n_kv_head == cfg.n_head:
        cfg_dict["n_kv_head"] = None  # the same thing spelled out
    for knob, required in REQUIREMENTS[candidate]:
        if cfg_dict[knob] != required:
            raise XLabError(
                f"model.{knob}={cfg_dict[knob]} has no exact transformers equivalent "
                f"(the closest, {candidate}, needs {knob}={required})"
            )
    return candidate


def attn_dropout(cfg: ModelConfig) -> float:
    return cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout


def hf_config(model: XLabModel, family: str, special_ids: dict[str, int | None]):
    import transformers  # transformers: lazily, only when used

    c = model.cfg
    common = dict(vocab_size=model.hparams["vocab_size"], tie_word_embeddings=c.tie_embeddings,
                  bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"),
                  pad_token_id=special_ids.get("pad"))
    if family == "gpt2":
        return transformers.GPT2Config(
            n_positions=c.max_len, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head, n_inner=default_d_ff(c),
            activation_function="gelu_new", layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout,
            embd_pdrop=c.dropout, attn_pdrop=attn_dropout(c), **common)
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "arcee": transformers.ArceeConfig}[family]
    return cls(
        hidden_size=c.d_model, intermediate_size=default_d_ff(c), num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head or c.n_head, head_dim=c.d_model // c.n_head,
        max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps, hidden_act=HF_ACT[family],
        attention_dropout=attn_dropout(c),
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attention_bias=False, **common)


def _layout(model: XLabModel, family: str) -> list[tuple[str, list[str], str]]:
    """(XLab name, transformers names, how) for every XLab tensor. how: "same"; "t" = transposed (GPT-2 stores
    linear weights as Conv1D, (in, out)); "cat" = the XLab tensor is the transformers tensors stacked by rows
    (our fused qkv and gate/up matmuls)."""
    c = model.cfg
    rows: list[tuple[str, list[str], str]] = []
    if family == "gpt2":
        rows += [("tok_emb.weight", ["transformer.wte.weight"], "same"),
                 ("pos_emb.emb.weight", ["transformer.wpe.weight"], "same")]
        for i in range(c.n_layer):
            for ours, theirs, how in [("norm1", "ln_1", "same"), ("attn.qkv", "attn.c_attn", "t"),
                                      ("attn.proj", "attn.c_proj", "t"), ("norm2", "ln_2", "same"),
                                      ("mlp.fc", "mlp.c_fc", "t"), ("mlp.proj", "mlp.c_proj", "t")]:
                rows += [(f"blocks.{i}.{ours}.weight", [f"transformer.h.{i}.{theirs}.weight"], how),
                         (f"blocks.{i}.{ours}.bias", [f"transformer.h.{i}.{theirs}.bias"], "same")]
        rows += [("norm_f.weight", ["transformer.ln_f.weight"], "same"),
                 ("norm_f.bias", ["transformer.ln_f.bias"], "same")]
    else:
        rows.append(("tok_emb.weight", ["model.embed_tokens.weight"], "same"))
        for i in range(c.n_layer):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            mlp_in = [f"{p}mlp.up_proj.weight"] if family == "arcee" else [f"{p}mlp.gate_proj.weight",
                                                                          f"{p}mlp.up_proj.weight"]
            rows += [(f"{b}attn.qkv.weight", [f"{p}self_attn.{x}_proj.weight" for x in "qkv"], "cat"),
                     (f"{b}attn.proj.weight", [f"{p}self_attn.o_proj.weight"], "same"),
                     (f"{b}mlp.fc.weight", mlp_in, "cat" if len(mlp_in) == 2 else "same"),
                     (f"{b}mlp.proj.weight", [f"{p}mlp.down_proj.weight"], "same"),
                     (f"{b}norm1.weight", [f"{p}input_layernorm.weight"], "same"),
                     (f"{b}norm2.weight", [f"{p}post_attention_layernorm.weight"], "same")]
            if family == "qwen3":
                rows += [(f"{b}attn.q_norm.weight", [f"{p}self_attn.q_norm.weight"], "same"),
                         (f"{b}attn.k_norm.weight", [f"{p}self_attn.k_norm.weight"], "same")]
        rows.append(("norm_f.weight", ["model.norm.weight"], "same"))
    rows.append(("lm_head.weight", ["lm_head.weight"], "same"))
    return rows


def _split_sizes(model: XLabModel, name: str) -> list[int]:
    c = model.cfg
    if name.endswith("attn.qkv.weight"):
        hd = c.d_model // c.n_head
        return [c.n_head * hd, (c.n_kv_head or c.n_head) * hd, (c.n_kv_head or c.n_head) * hd]
    return [default_d_ff(c)] * 2  # mlp.fc: gate, up


def to_hf_state_dict(model: XLabModel, family: str) -> dict[str, torch.Tensor]:
    """XLab parameter names and layouts → the transformers family's."""
    sd, out = model.state_dict(), {}
    for ours, theirs, how in _layout(model, family):
        if how == "cat":
            out.update(zip(theirs, sd[ours].split(_split_sizes(model, ours)), strict=True))
        else:
            out[theirs[0]] = sd[ours].t().contiguous() if how == "t" else sd[ours]
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], model: XLabModel, family: str) -> dict[str, torch.Tensor]:
    """transformers names → XLab's (the inverse of to_hf_state_dict). A tied head may be absent from hf_sd."""
    hf_sd = dict(hf_sd)
    if "lm_head.weight" not in hf_sd:
        hf_sd["lm_head.weight"] = hf_sd["transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"]
    out = {}
    for ours, theirs, how in _layout(model, family):
        parts = [hf_sd[name] for name in theirs]
        out[ours] = torch.cat(parts) if how == "cat" else (parts[0].t().contiguous() if how == "t" else parts[0])
    return out


def to_hf_model(model: XLabModel, special_ids: dict[str, int | None] | None = None):
    """A transformers model computing exactly what `model` computes (fp32, same weights)."""
    import transformers  # transformers: lazily, only when used

    family = hf_family(model.cfg)
    config = hf_config(model, family, special_ids or {})
    hf = getattr(transformers, HF_CLASSES[family])(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model, family), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF {family} conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def xlab_config_from_hf(config) -> ModelConfig:
    """transformers config → XLab ModelConfig (GPT-2, Llama, Qwen3 and Arcee families)."""
    t = config.model_type
    if t == "gpt2":
        return ModelConfig(n_layer=config.n_layer, n_head=config.n_head, d_model=config.n_embd,
                           max_len=config.n_positions, d_ff=config.n_inner or 4 * config.n_embd,
                           norm_eps=config.layer_norm_epsilon, pos_emb="learned", norm="layernorm", mlp="gelu",
                           bias=True, tie_embeddings=True)
    if t in ("llama", "qwen3", "arcee"):
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            raise XLabError(f"{t} head_dim={config.head_dim} x heads != hidden_size: not representable in XLab")
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": 10000.0, "rope_type": "default"}
        if rope.get("rope_type", "default") != "default":
            raise XLabError(f"{t} rope_type={rope['rope_type']} is not supported (only default RoPE)")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise XLabError(f"{t} with attention/mlp biases is not supported")
        if config.hidden_act != HF_ACT[t]:
            raise XLabError(f"{t} hidden_act={config.hidden_act!r} is not supported (only {HF_ACT[t]!r})")
        return ModelConfig(
            n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
            n_kv_head=config.num_key_value_heads, d_model=config.hidden_size,
            max_len=config.max_position_embeddings, pos_emb="rope", rope_theta=float(rope["rope_theta"]),
            norm="rmsnorm", norm_eps=config.rms_norm_eps, mlp="relu2" if t == "arcee" else "swiglu",
            d_ff=config.intermediate_size,
            qk_norm=t == "qwen3", bias=False, tie_embeddings=bool(config.tie_word_embeddings))
    raise XLabError(f"transformers model_type={t!r} cannot be imported; valid: gpt2, llama, qwen3, arcee")


def from_hf_model(hf_model) -> XLabModel:
    cfg = xlab_config_from_hf(hf_model.config)
    model = XLabModel(hf_model.config.vocab_size, **asdict(cfg))
    family = hf_family(cfg)
    model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), model, family))
    return model


@dataclass
class HFInit:
    """What `init_from=hf:DIR` needs: the model (weights loaded), its tokenizer file and special-token names."""

    model: XLabModel
    tokenizer_file: Path
    tokenizer: TokenizerConfig

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg


def load_init(spec: str) -> HFInit:
    """`init_from` values: "hf:DIR" (a local transformers model directory)."""
    kind, _, path = spec.partition(":")
    if kind != "hf" or not path:
        raise XLabError(f"init_from={spec!r} is not understood; valid: hf:DIR (a local transformers model directory)")
    return load_hf_dir(path)


def load_hf_dir(path: str | Path) -> HFInit:
    """Read a local transformers model directory (config.json, weights, tokenizer.json)."""
    import transformers  # transformers: lazily, only when used

    d = Path(path).expanduser()
    if d.is_dir():  # transformers opens its files by name: a planted link would make it read any file
        check_links(d.resolve())
    if not (d / "config.json").is_file():
        raise XLabError(f"{str(path)!r} is not a transformers model directory (no config.json)")
    if not (d / "tokenizer.json").is_file():
        raise XLabError(f"{str(path)!r} has no tokenizer.json (a fast tokenizer is needed)")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model = from_hf_model(hf)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}

    def name(key: str, fallback: str | None) -> str | None:
        value = tok_cfg.get(key)
        return value.get("content") if isinstance(value, dict) else (value or fallback)

    eos = name("eos_token", None)
    if eos is None:
        raise XLabError(f"{str(path)!r}: tokenizer_config.json names no eos_token")
    specials = TokenizerConfig(name="pretrained", vocab_size=hf.config.vocab_size,
                               sos_token=name("bos_token", eos), eos_token=eos,
                               pad_token=name("pad_token", eos), unk_token=name("unk_token", eos))
    return HFInit(model, d / "tokenizer.json", specials)


def export_hf(ckpt: str | Path | Checkpoint, out: str | Path) -> Path:
    """Checkpoint/export → a transformers model directory that AutoModelForCausalLM/AutoTokenizer load offline."""
    import transformers  # transformers: lazily, only when used

    ckpt = Checkpoint.of(ckpt)
    load_tokenizer(ckpt)  # refuse a tokenizer that does not fit the weights before writing anything
    tok = ckpt.section("tokenizer", TokenizerConfig)
    model = XLabModel.load_from_checkpoint(ckpt)
    hf_family(model.cfg)  # refuse before writing anything
    check_writable_dir(out, "out")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise XLabError(f"export directory {str(out)!r} exists and is not empty; choose another out=")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(ckpt.file(TOKENIZER)), bos_token=tok.sos_token, eos_token=tok.eos_token,
        pad_token=tok.pad_token, unk_token=tok.unk_token, model_max_length=model.max_len,
        add_bos_token=True)  # every training document starts with <sos>: tokenizer(text) gives what the model saw
    ids = {"bos": fast.bos_token_id, "eos": fast.eos_token_id, "pad": fast.pad_token_id}
    to_hf_model(model, ids).save_pretrained(out)
    fast.save_pretrained(out)
    return out
