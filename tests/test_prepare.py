"""Preparation at scale, on small data: sharded token files read as one stream, a preparation killed with SIGKILL
and rerun equals an uninterrupted one (for any number of processes and read batch size), `python -m xlab.prepare`,
and `data=text_files` on files the test writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, run_cli, split_ids
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.data.datamodule import RandomWindows, XLabDataModule, eval_windows
from xlab.data.prepare import prepare_data
from xlab.data.shards import SplitWriter, TokenShards
from xlab.data.sources import SOURCES, document_batches
from xlab.data.synthetic import ArticleWriter, write_wikipedia_parquet
from xlab.errors import XLabError
from xlab.training.config import TrainConfig

register_schema("train", TrainConfig)


def config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


def test_windows_read_across_shards_like_one_array(tmp_path):
    flat = np.arange(1000, dtype=np.uint16)
    shards = TokenShards([flat[:300], flat[300:310], flat[310:]])
    assert len(shards) == 1000 and np.array_equal(np.asarray(shards), flat)
    idx = np.array([[0, 299, 300, 309, 310, 999]])
    assert np.array_equal(shards[idx], flat[idx]) and np.array_equal(shards[295:315], flat[295:315])
    a, b = RandomWindows(shards, 16, 8, seed=3), RandomWindows(flat, 16, 8, seed=3)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert (xa == xb).all() and (ya == yb).all() and (ya == xa + 1).all()
    ev = [y for _, y in eval_windows(shards, 16, 4)]
    assert np.array_equal(np.concatenate([y.flatten().numpy() for y in ev]), np.arange(1, 993))


def test_split_writer_cuts_shards_between_documents(tmp_path):
    w = SplitWriter(tmp_path, "train", np.uint16, shard_bytes=2 * 100)  # 100 tokens a shard
    lengths = np.array([30, 30, 30, 30, 250, 10, 10])
    w.append(np.arange(lengths.sum()) % 60000, lengths[:3])
    w.append(np.arange(lengths[:3].sum(), lengths.sum()) % 60000, lengths[3:])
    shards = w.close()
    assert [(s["file"], s["tokens"], s["documents"]) for s in shards] == [
        ("train.bin", 90, 3), ("train.1.bin", 30, 1), ("train.2.bin", 250, 1), ("train.3.bin", 20, 2)]
    stream = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint16) for s in shards])
    assert np.array_equal(stream, np.arange(lengths.sum()))


KILLED = """
import os, signal, sys
import xlab.data.shards as shards
import xlab.data.sources as sources
sources.READ_BATCH = 40          # several batches, so progress is recorded before the kill
appends = 0
original = shards.SplitWriter.append

def append(self, tokens, lengths):
    global appends
    original(self, tokens, lengths)
    appends += self.split == "train"
    if appends == 5:             # mid-way: after the train split's 5th batch, before the other splits get theirs
        os.kill(os.getpid(), signal.SIGKILL)

shards.SplitWriter.append = append
sys.argv = ["xlab.prepare", *sys.argv[1:]]
from xlab.prepare import main
main()
"""


def cache_files(tokens_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tokens_dir.iterdir())}


def test_killed_preparation_resumes_to_the_same_shards(tmp_path):
    corpus = tmp_path / "wiki"
    write_wikipedia_parquet(corpus, articles=400, shards=3)
    overrides = ["data=wikipedia", f"data.data_files={corpus}/*.parquet", "data.shard_size_mb=0.03",
                 "tokenizer.vocab_size=500"]
    cfg = config(*overrides, "data.num_proc=2")
    reference = prepare_data(cfg.data, cfg.tokenizer, tmp_path / "ref_cache")  # uninterrupted, 2 processes

    env = {**os.environ, "XLAB_CACHE_DIR": str(tmp_path / "cache")}
    args = [*overrides, "data.num_proc=1", f"hydra.run.dir={tmp_path / 'run'}"]
    killed = subprocess.run([sys.executable, "-c", KILLED, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tokens_root = tmp_path / "cache" / "tokens"
    partial = [p for p in tokens_root.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "progress.json").exists()
    assert not any((p / "meta.json").exists() for p in tokens_root.iterdir())  # nothing looks complete

    proc = subprocess.run([sys.executable, "-m", "xlab.prepare", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "reusing cached tokenizer" in out and "resuming token files" in out
    assert "one epoch = " in out and "train tokens" in out
    resumed = tokens_root / reference.tokens_dir.name
    assert cache_files(resumed) == cache_files(reference.tokens_dir)  # byte for byte, index included
    assert not list(tokens_root.glob("*.partial"))
    meta = json.loads((resumed / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 5
    assert all(s["tokens"] * 2 <= 0.03 * 2**20 for s in meta["splits"]["train"]["shards"])


def test_prepare_cli_reports_bad_input_in_one_line(tmp_path):
    proc = run_cli("prepare", "data=wikipedia", f"data.data_files={tmp_path}/*.parquet",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: no files match data.data_files='{tmp_path}/*.parquet'"


def write_txt_corpus(directory: Path, n: int) -> None:
    writer = ArticleWriter(seed=5)
    for i in range(n):
        sub = directory / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(writer.article(i)["text"], encoding="utf-8")


def test_text_files_trains_on_a_directory_of_txt_files(tmp_path):
    from xlab.training.trainer import train

    write_txt_corpus(tmp_path / "corpus", 80)
    cfg = config("data=text_files", f"data.data_files={tmp_path / 'corpus'}", *TINY, "tokenizer.vocab_size=400",
                 "trainer.max_steps=4", "trainer.eval_every=4", "trainer.eval_batches=1")
    ids = split_ids(cfg.data)
    assert sum(map(len, ids.values())) == 80 and "part0/doc000.txt" in set().union(*ids.values())
    val = train(cfg, tmp_path / "run")
    assert 0 < val["loss"] < 10
    dm = XLabDataModule(cfg.data, cfg.tokenizer, cfg.paths.cache_dir)
    first = dm.tokens("train").documents(dm.tokenizer.sos_id, limit=1)[0]
    assert dm.tokenizer.decode(first) in {(tmp_path / "corpus" / i).read_text() for i in ids["train"]}


def test_text_files_jsonl_parquet_and_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"key": "k1", "body": "first"}\n\n{"key": "k2", "body": "second"}\n')
    pq.write_table(pa.table({"body": ["third", "fourth"]}), tmp_path / "b.parquet")

    def docs(**kw) -> list[tuple[str, str]]:
        data = config("data=text_files", f"data.data_files={tmp_path}/*", *(f"data.{k}={v}" for k, v in kw.items()))
        tables = document_batches(SOURCES.get("text_files").load(data.data, False))
        return [(i, t) for table in tables for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist())]

    assert docs(text_column="body") == [("a.jsonl:1", "first"), ("a.jsonl:3", "second"), ("b.parquet:0", "third"),
                                        ("b.parquet:1", "fourth")]
    with pytest.raises(XLabError, match=r"unknown column data.text_column='text' in '.*a.jsonl' line 1; its col"):
        docs()
    with pytest.raises(XLabError, match=r"unknown column data.id_column='key' in '.*b.parquet'; its columns: body"):
        docs(text_column="body", id_column="key")
    (tmp_path / "b.parquet").unlink()
    assert docs(text_column="body", id_column="key")[0] == ("k1", "first")

    (tmp_path / "c.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(XLabError, match=r"c.txt' is not UTF-8 text \(invalid byte at offset 3\)"):
        docs(text_column="body")
    (tmp_path / "c.txt").write_text("  \n")
    with pytest.raises(XLabError, match=r"c.txt' is empty"):
        docs(text_column="body")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(XLabError, match=r"d.csv', which is not one of .txt, .jsonl, .parquet"):
        docs(text_column="body")
