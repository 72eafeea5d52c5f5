"""transformers interop: logit parity, round trips, tokenizer ids, CLI export and init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from xlab.errors import XLabError
from xlab.models import XLabModel
from xlab.models.hf import from_hf_model, hf_family, to_hf_model

FAMILIES = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    "llama_tied_mqa": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True, n_kv_head=1),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, qk_norm=True,
                  n_kv_head=2, norm_eps=1e-6, rope_theta=1e6),
    "arcee": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", bias=False, tie_embeddings=False, n_kv_head=2),
}


def tiny_model(**knobs) -> XLabModel:
    torch.manual_seed(0)
    model = XLabModel(97, n_layer=2, n_head=4, d_model=32, max_len=24, **knobs).eval()
    with torch.no_grad():  # norms start at ones/zeros; randomise them so the parity check sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    model = tiny_model(**FAMILIES[family])
    hf = to_hf_model(model)
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM",
                                 "arcee": "ArceeForCausalLM"}.get(family, "LlamaForCausalLM")
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_xlab_to_hf_round_trip_is_exact(family):
    hf = to_hf_model(tiny_model(**FAMILIES[family]))
    back = to_hf_model(from_hf_model(hf))
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("knob", "value"), [("mlp", "gelu"), ("logit_softcap", 30.0), ("norm_position", "post"),
                                             ("norm", "layernorm")])
def test_no_exact_equivalent_is_refused_naming_the_knob(knob, value):
    cfg = tiny_model(**{**FAMILIES["llama"], knob: value}).cfg
    with pytest.raises(XLabError, match=f"model.{knob}="):
        hf_family(cfg)


def test_an_activation_xlab_does_not_compute_is_refused():
    from xlab.models.hf import xlab_config_from_hf

    config = to_hf_model(tiny_model(**FAMILIES["arcee"])).config
    config.hidden_act = "gelu"
    with pytest.raises(XLabError, match="arcee hidden_act='gelu' is not supported"):
        xlab_config_from_hf(config)


def test_cli_export_hf_loads_offline_with_same_logits_and_token_ids(tiny_run: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlab.datamodules import XLabDataModule

    ckpt = tiny_run / "checkpoints" / "last"
    out = tmp_path / "hf"
    run_cli("export", f"ckpt={ckpt}", "format=hf", f"out={out}")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    model = XLabModel.load_from_checkpoint(ckpt).eval()
    tok = XLabDataModule.load_from_checkpoint(ckpt).tokenizer

    text = "Return  the\tlist —  naïve café 数字 🙂\n\n  <|eos|> end<|sos|>x"
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok(text)["input_ids"] == [tok.sos_id, *ids]  # led by <sos>, as every training document is
    assert tok[tok.eos_token] in ids  # special tokens in text are matched as specials by both
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id == tok.sos_id

    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_init_from_hf_dir_trains(tmp_path: Path, tiny_run: Path):
    """Fine-tuning starts from a transformers Llama directory: its weights, architecture and tokenizer."""
    from transformers import AutoModelForCausalLM

    from xlab.datamodules import XLabDataModule
    from xlab.models.hf import export_hf

    # A Llama-architecture checkpoint with our tokenizer, written as a transformers directory.
    vocab = len(XLabDataModule.load_from_checkpoint(tiny_run / "checkpoints" / "last").tokenizer)
    src = XLabModel(vocab, n_layer=1, n_head=2, d_model=32, max_len=64, **FAMILIES["llama"])
    hf = to_hf_model(src)
    hf_dir = tmp_path / "llama"
    export_dir = export_hf(tiny_run / "checkpoints" / "last", tmp_path / "tok")  # for the tokenizer files
    hf.save_pretrained(hf_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / f).write_bytes((export_dir / f).read_bytes())

    run = tmp_path / "run"
    run_cli("train", *TINY, f"init_from=hf:{hf_dir}", "trainer.max_steps=2", "trainer.eval_batches=1",
            f"hydra.run.dir={run}")
    ckpt = run / "checkpoints" / "last"
    cfg = (ckpt / "config.yaml").read_text()
    assert "pos_emb: rope" in cfg and "mlp: swiglu" in cfg and "n_layer: 1" in cfg
    tuned = XLabModel.load_from_checkpoint(ckpt)
    reloaded = from_hf_model(AutoModelForCausalLM.from_pretrained(hf_dir))
    assert tuned.num_params() == reloaded.num_params()
    assert not torch.equal(tuned.lm_head.weight, reloaded.lm_head.weight)  # it trained

    # reads stay inside the directory: a file linked to one outside it is refused before anything is read
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((hf_dir / "tokenizer_config.json").read_bytes())
    (hf_dir / "tokenizer_config.json").unlink()
    (hf_dir / "tokenizer_config.json").symlink_to(outside)
    proc = run_cli("train", *TINY, f"init_from=hf:{hf_dir}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'r2'}",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: refusing to read")
    assert "tokenizer_config.json" in proc.stderr and "outside" in proc.stderr
