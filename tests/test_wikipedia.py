"""`data=wikipedia` on local parquet shards with Wikipedia's schema (the hub is unreachable in CI): the split by
article, a tiny training run, samples on the predict split, and the `experiment=wiki_large` configuration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY, run_cli, split_ids
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.data.prepare import prepare_data
from xlab.data.sources import SPLITS
from xlab.data.synthetic import write_wikipedia_parquet
from xlab.errors import XLabError
from xlab.training.config import TrainConfig

register_schema("train", TrainConfig)
ARTICLES = 300


def config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wiki")
    write_wikipedia_parquet(out, articles=ARTICLES, shards=4, row_group_size=50)
    return out


def wiki(directory: Path, *overrides: str) -> TrainConfig:
    return config("data=wikipedia", f"data.data_files={directory}/*.parquet", *overrides)


def test_split_by_article_sizes_disjoint_and_stable_under_reshuffling(wiki_dir, tmp_path):
    ids = split_ids(wiki(wiki_dir).data)
    for name, frac in zip(SPLITS, [0.9, 0.05, 0.025, 0.025]):
        assert abs(len(ids[name]) - frac * ARTICLES) <= 1, (name, len(ids[name]))
    members = {name: set(v) for name, v in ids.items()}
    assert sum(map(len, members.values())) == ARTICLES == len(set().union(*members.values()))
    assert split_ids(wiki(wiki_dir).data) == ids  # identical across runs

    # Shuffle the rows and cut them into a different number of shards: no article changes split.
    table = pa.concat_tables(pq.read_table(p) for p in sorted(wiki_dir.glob("*.parquet")))
    order = list(range(table.num_rows))
    random.Random(0).shuffle(order)
    table = table.take(order)
    resharded = tmp_path / "resharded"
    resharded.mkdir()
    for i, lo in enumerate(range(0, table.num_rows, 70)):
        pq.write_table(table.slice(lo, 70), resharded / f"part-{i}.parquet", row_group_size=25)
    again = split_ids(wiki(resharded).data)
    assert {name: set(v) for name, v in again.items()} == members

    # The preparation path (streamed, batch by batch) routes the same numbers of articles to each split.
    cfg = wiki(resharded, "tokenizer.vocab_size=400")
    meta_a = json.loads((prepare_data(cfg.data, cfg.tokenizer, tmp_path / "cache").tokens_dir / "meta.json")
                        .read_text())
    assert {name: meta_a["splits"][name]["documents"] for name in SPLITS} == {k: len(v) for k, v in ids.items()}
    other_seed = split_ids(wiki(wiki_dir, "data.split_seed=99").data)
    assert set(other_seed["val"]) != members["val"]


def test_max_documents_and_bad_input(wiki_dir, tmp_path):
    ids = split_ids(wiki(wiki_dir, "data.max_documents=100").data)
    assert sum(map(len, ids.values())) == 100
    with pytest.raises(XLabError, match="no files match data.data_files="):
        split_ids(wiki(tmp_path / "nowhere").data)
    with pytest.raises(XLabError, match="unknown column data.text_column='body' in .*; its columns: id, url, title"):
        split_ids(wiki(wiki_dir, "data.text_column=body").data)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(XLabError, match="notes.txt', which is not one of .parquet"):
        split_ids(config("data=wikipedia", f"data.data_files={tmp_path}/*").data)


@pytest.fixture(scope="module")
def wiki_run(wiki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained in-process on the parquet corpus, with token shards of ~40 KB (several per split)."""
    from xlab.training.trainer import train

    run_dir = tmp_path_factory.mktemp("wiki_run")
    cfg = wiki(wiki_dir, *TINY, "tokenizer.vocab_size=512", "data.shard_size_mb=0.04", "trainer.max_steps=8",
               "trainer.eval_every=4", "trainer.eval_batches=2", "trainer.ckpt_every=8", "scheduler.warmup_steps=2")
    train(cfg, run_dir)
    return run_dir


def test_tiny_training_run_on_wikipedia(wiki_run: Path):
    lines = [json.loads(x) for x in (wiki_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val/loss" in r] == [4, 8]
    assert all(0 < r["val/loss"] < 10 for r in lines if "val/loss" in r)
    saved = yaml.safe_load((wiki_run / "checkpoints" / "last" / "config.yaml").read_text())
    assert saved["data"]["name"] == "wikipedia" and saved["data"]["data_files"].endswith("*.parquet")

    from xlab.data.datamodule import XLabDataModule

    train = XLabDataModule.load_from_checkpoint(wiki_run / "checkpoints" / "last").tokens("train")
    assert len(train.arrays) > 3  # the run read windows across several shard files


def test_generate_from_the_predict_split(wiki_run: Path, tmp_path: Path):
    ckpt = wiki_run / "checkpoints" / "last"
    args = [f"ckpt={ckpt}", "prompts_from=predict", "num_prompts=3", "prompt_tokens=12", "max_new_tokens=8"]
    out = run_cli("generate", *args).stdout
    assert "wrote" in out
    rows = [json.loads(x) for x in (ckpt / "samples_predict.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and [r["document"] for r in rows] == sorted(r["document"] for r in rows)
    for r in rows:
        assert set(r) == {"document", "prompt", "generated", "true_continuation", "prompt_tokens", "generated_tokens"}
        assert r["prompt_tokens"] == 12 and r["true_continuation"] and 0 <= r["generated_tokens"] <= 8
    md = (ckpt / "samples_predict.md").read_text()
    assert md.count("**True continuation**") == 3 and rows[0]["prompt"].splitlines()[0] in md
    run_cli("generate", *args, f"out={tmp_path / 'again'}")
    assert (tmp_path / "again.jsonl").read_text() == (ckpt / "samples_predict.jsonl").read_text()  # seeded

    # The prompt is the start of a real predict-split article: its title, then its text.
    from xlab.data.datamodule import XLabDataModule

    dm = XLabDataModule.load_from_checkpoint(ckpt)
    first = dm.tokens("predict").documents(dm.tokenizer.sos_id, limit=1)[0]
    assert dm.tokenizer.decode(first).startswith(rows[0]["prompt"] + rows[0]["true_continuation"])

    bad = run_cli("generate", f"ckpt={ckpt}", "prompts_from=nope", check=False)
    expected = "Invalid value 'nope', expected one of [train, val, test, predict]"
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: Error merging override prompts_from=nope {expected}"


def test_wiki_large_composes_with_the_sizes_of_the_issue():
    proc = run_cli("train", "experiment=wiki_large", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    m, t = cfg["model"], cfg["trainer"]
    assert (m["n_layer"], m["d_model"], m["n_head"], m["max_len"]) == (12, 768, 12, 1024)
    assert cfg["tokenizer"]["name"] == "bpe" and cfg["tokenizer"]["vocab_size"] == 32768
    assert cfg["data"]["name"] == "wikipedia" and cfg["data"]["hub_config"] == "20231101.en"
    assert t["precision"] == "bf16" and cfg["scheduler"]["name"] == "cosine"
    tokens_per_step = t["batch_size"] * t["grad_accum_steps"] * m["max_len"]
    assert 0.45e6 <= tokens_per_step <= 0.55e6
    assert t["max_steps"] * tokens_per_step > 4e9  # about one epoch of the ~4.3B-token train split
    assert t["eval_every"] <= 500 and t["ckpt_every"] <= 2000 and t["ckpt_every"] % t["eval_every"] == 0

    from xlab.training.estimate import epoch_estimate, model_flops_per_token

    typed = config("experiment=wiki_large")
    flops, params = model_flops_per_token(typed.model, 32768)
    assert 100e6 < params < 130e6  # ~111M with a 32k vocab (GPT-2 small's 124M has a 50k vocab)
    lines = epoch_estimate(flops, 4_300_000_000, tokens_per_step, device_name="NVIDIA H100 80GB HBM3")
    assert "989 TFLOPS" in lines[1] and "at 40% MFU" in lines[1]
