"""Decoding: KV cache exactness, samplers equal to transformers' generate, processors, stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xlab.errors import XLabError
from xlab.generation import api as inference
from xlab.generation.config import SamplerConfig
from xlab.generation.sampling import (
    beam_search,
    check_sampler_config,
    decode_tokens,
    process,
    top_k_filter,
    top_p_filter,
)
from xlab.models import XLabModel
from xlab.models.hf import to_hf_model
from xlab.models.transformer import KVCache

EOS = 3
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)


def tiny(max_len: int = 64, **knobs) -> XLabModel:
    torch.manual_seed(0)
    return XLabModel(97, n_layer=2, n_head=4, d_model=32, max_len=max_len, **knobs).eval()


def eos_prone(model: XLabModel, like: int) -> XLabModel:
    """Make eos likelier than token `like` (the greedy first token), so beams end in eos."""
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[like] * 1.3
    return model


@pytest.fixture(scope="module")
def trained(tiny_run: Path):
    from xlab.datamodules import XLabDataModule

    ckpt = tiny_run / "checkpoints" / "last"
    model = XLabModel.load_from_checkpoint(ckpt).eval()
    return model, XLabDataModule.load_from_checkpoint(ckpt).tokenizer


@pytest.mark.parametrize("knobs", [{}, LLAMA], ids=["learned", "rope"])
def test_cached_decoding_equals_uncached(knobs):
    model = tiny(**knobs)
    x = torch.randint(0, 97, (2, 20))
    full = model(x)
    cache = KVCache(model, 2)
    parts = [model(x[:, :7], cache), model(x[:, 7:11], cache)] + [model(x[:, i:i + 1], cache) for i in range(11, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("knobs", [{}, LLAMA], ids=["learned", "rope"])
def test_left_padded_batch_equals_prompts_one_at_a_time(knobs):
    model = tiny(**knobs)
    prompts = [torch.randint(4, 97, (n,)).tolist() for n in (9, 4, 6)]
    ids, mask = inference.left_pad(prompts, 2, torch.device("cpu"))
    batched = model(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0]
        assert (batched[i, -len(p):] - alone).abs().max() <= 1e-5
    cfg = SamplerConfig(name="greedy")
    together = decode_tokens(model, ids, mask, cfg, 15, [EOS], sampling=False)
    for i, p in enumerate(prompts):
        alone = decode_tokens(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), cfg, 15, [EOS],
                              sampling=False)
        assert together[i].tokens == alone[0].tokens


def test_window_slides_past_max_len_like_uncached_cropping():
    model = tiny(max_len=16, **LLAMA)
    prompt = torch.randint(4, 97, (1, 10))
    got = decode_tokens(model, prompt, torch.ones_like(prompt), SamplerConfig(), 20, [], sampling=False)[0].tokens
    seq = prompt[0].tolist()
    for _ in range(20):  # the reference: recompute from the last max_len - 1 tokens every step
        seq.append(int(model(torch.tensor([seq[-15:]]))[0, -1].argmax()))
    assert got == seq[10:]


def test_greedy_equals_transformers_for_50_tokens(trained):
    model, tok = trained
    hf = to_hf_model(model, {"eos": tok.eos_id, "pad": tok[tok.pad_token], "bos": tok.sos_id})
    for text in ("The list", "Return the number of"):
        ours = inference.generate(model, tok, text, sampler="greedy", max_new_tokens=50)[0]
        ids = torch.tensor([[tok.sos_id, *tok.encode(text)]])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok[tok.pad_token])[0, ids.shape[1]:].tolist()
        assert ours.tokens == theirs[: len(ours.tokens)] and len(ours.tokens) in (50, len(theirs))


BEAM_SETTINGS = [(4, 1.0, "false", 1), (4, 1.0, "false", 3), (3, 0.5, "true", 2), (5, 2.0, "never", 5),
                 (2, -1.0, "true", 1), (4, 0.0, "never", 2)]


@pytest.mark.parametrize("eos_hit", [True, False], ids=["eos", "no-eos"])
@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "num_return"), BEAM_SETTINGS)
def test_beam_search_equals_transformers(num_beams, length_penalty, early_stopping, num_return, eos_hit):
    model = tiny(**LLAMA)
    ids = torch.randint(4, 97, (2, 5), generator=torch.Generator().manual_seed(num_beams))
    mask = torch.ones_like(ids)
    if eos_hit:
        greedy = decode_tokens(model, ids, mask, SamplerConfig(), 1, [], sampling=False)[0].tokens[0]
        eos_prone(model, greedy)
    hf = to_hf_model(model, {"eos": EOS, "pad": 2})
    cfg = SamplerConfig(name="beam", num_beams=num_beams, length_penalty=length_penalty,
                        early_stopping=early_stopping, num_return_sequences=num_return)
    ours = beam_search(model, ids, mask, cfg, 12, [EOS])
    es = {"true": True, "false": False, "never": "never"}[early_stopping]
    r = hf.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=es, num_return_sequences=num_return, eos_token_id=EOS, pad_token_id=2,
                    do_sample=False, output_scores=True, return_dict_in_generate=True)
    lengths = (r.beam_indices >= 0).sum(1)
    theirs = [r.sequences[i, 5:5 + n].tolist() for i, n in enumerate(lengths.tolist())]
    assert [s.tokens for s in ours] == theirs
    assert [s.score for s in ours] == pytest.approx(r.sequences_scores.tolist(), abs=1e-5)
    ends_in_eos = any(s.tokens[-1] == EOS for s in ours)
    if not eos_hit:
        assert not ends_in_eos
    elif length_penalty <= 1:  # a length penalty > 1 favours the long beams that did not stop
        assert ends_in_eos


def test_filters_equal_transformers_processors():
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=g) * 3
    seqs = torch.randint(0, 50, (4, 7), generator=g)
    for k in (1, 5, 50, 80):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(seqs, scores))
    for p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(seqs, scores))
    cfg = SamplerConfig(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, min_new_tokens=3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seqs, scores.clone())
    expected = MinNewTokensLengthLogitsProcessor(5, 3, EOS)(seqs, expected)  # 2 new tokens after a 5-token prompt
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(seqs, expected)
    assert torch.equal(process(scores, seqs, 2, cfg, [EOS], sampling=True), expected)


def test_seeded_sampling_reproduces_and_stop_strings_cut(trained):
    model, tok = trained
    a = inference.generate(model, tok, "The", sampler="top_p", top_p=0.9, temperature=0.8, seed=1, max_new_tokens=30)
    b = inference.generate(model, tok, "The", sampler="top_p", top_p=0.9, temperature=0.8, seed=1, max_new_tokens=30)
    c = inference.generate(model, tok, "The", sampler="top_p", top_p=0.9, temperature=0.8, seed=2, max_new_tokens=30)
    assert a == b and a[0].tokens != c[0].tokens

    full = inference.generate(model, tok, "The", sampler="greedy", max_new_tokens=40)[0]
    stop = full.text[10:13]
    assert stop and stop in full.text
    cut = inference.generate(model, tok, "The", sampler="greedy", max_new_tokens=40, stop=[stop])[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.tokens) < len(full.tokens)  # decoding stopped early too


def test_generate_batches_prompts_and_beams(trained):
    model, tok = trained
    out = inference.generate(model, tok, ["The list", "A"], sampler="beam", num_beams=3, num_return_sequences=2,
                             max_new_tokens=8)
    assert [g.prompt for g in out] == ["The list", "The list", "A", "A"]
    assert out[0].score >= out[1].score and out[2].score >= out[3].score


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
        (dict(top_k=-1), "top_k=-1 must be >= 0"),
        (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (dict(name="beam", num_beams=0), "num_beams=0 must be >= 1"),
        (dict(name="beam", num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be in [1, num_beams=2]"),
        (dict(early_stopping="sometimes"), "valid: true, false, never"),
        (dict(name="nucleus"), "unknown sampler 'nucleus'"),
    ],
)
def test_invalid_sampler_values(options, message):
    with pytest.raises(XLabError) as err:
        check_sampler_config(SamplerConfig(**options))
    assert message in str(err.value)
