"""Atomic publishing (xlab/fsio.py): a directory or symlink appears complete or not at all, and survives a power
cut once published: every file and the parent directory are fsynced, the parent after the rename."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xlab.cli import CONFIG_DIR, register_schema
from xlab.data.prepare import prepare_data
from xlab.data.synthetic import ArticleWriter
from xlab.fsio import fsync_dir, publish_dir, publish_symlink
from xlab.training.config import TrainConfig

register_schema("train", TrainConfig)
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps fds to paths through /proc")


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, ...]]:
    """Every os.fsync (as ("fsync", path)) and os.replace (as ("replace", src, dst)), in call order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        real_replace(src, dst, **kwargs)
        log.append(("replace", real(src), real(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def real(path: str | Path) -> str:
    """`path` with its parent resolved, as /proc names an fd (the last part is not followed: it may be a link)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def fsynced_after_rename(events: list[tuple[str, ...]], final: Path) -> bool:
    """The parent of `final` was fsynced after the (last) rename onto `final`."""
    renamed = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == real(final)]
    return bool(renamed) and ("fsync", os.path.dirname(real(final))) in events[renamed[-1] + 1:]


def make_tree(root: Path) -> dict[str, str]:
    files = {"a.txt": "alpha", "sub/b.bin": "beta", "sub/deeper/c": "gamma"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def test_publish_dir_moves_the_tree_into_place(tmp_path):
    files = make_tree(tmp_path / ".tmp")
    assert publish_dir(tmp_path / ".tmp", tmp_path / "final")
    assert not (tmp_path / ".tmp").exists()
    assert {n: (tmp_path / "final" / n).read_text() for n in files} == files


@needs_proc
def test_publish_dir_fsyncs_every_file_then_the_parent_after_the_rename(tmp_path, events):
    tmp, final = tmp_path.resolve() / "out" / ".tmp", tmp_path.resolve() / "out" / "final"
    files = make_tree(tmp)
    publish_dir(tmp, final)
    rename = events.index(("replace", str(tmp), str(final)))
    before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {str(tmp / n) for n in files} | {str(tmp), str(tmp / "sub"), str(tmp / "sub" / "deeper")} <= before
    assert ("fsync", str(final.parent)) in events[rename + 1:]


def test_publish_dir_first_writer_wins_unless_replace(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old").write_text("old")
    make_tree(tmp_path / ".tmp1")
    assert not publish_dir(tmp_path / ".tmp1", final)  # kept, and the loser's tree is cleaned up
    assert sorted(p.name for p in final.iterdir()) == ["old"] and not (tmp_path / ".tmp1").exists()
    files = make_tree(tmp_path / ".tmp2")
    assert publish_dir(tmp_path / ".tmp2", final, replace=True)
    assert not (final / "old").exists() and all((final / n).read_text() == t for n, t in files.items())


def test_publish_dir_raises_when_the_rename_fails_for_another_reason(tmp_path):
    make_tree(tmp_path / ".tmp")
    with pytest.raises(OSError):
        publish_dir(tmp_path / ".tmp", tmp_path / "missing_parent" / "final")
    assert (tmp_path / ".tmp" / "a.txt").exists()


@needs_proc
def test_publish_symlink_points_at_the_target_and_fsyncs_the_parent(tmp_path, events):
    for name in ("step_1", "step_2"):
        (tmp_path / name).mkdir()
    link = tmp_path / "last"
    publish_symlink(link, "step_1")
    publish_symlink(link, "step_2")  # replaces the link, not the directory it names
    assert os.readlink(link) == "step_2" and link.resolve() == (tmp_path / "step_2").resolve()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "step_1").is_dir()
    assert fsynced_after_rename(events, link)


def test_fsync_dir_ignores_only_filesystems_without_directory_fsync(tmp_path, monkeypatch):
    def refuse(code: int):
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    fsync_dir(tmp_path)
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError):
        fsync_dir(tmp_path)


@needs_proc
def test_data_cache_fsyncs_the_parent_of_each_published_entry(tmp_path, events):
    writer = ArticleWriter(seed=5)
    (tmp_path / "corpus").mkdir()
    for i in range(12):
        (tmp_path / "corpus" / f"doc{i:02d}.txt").write_text(writer.article(i)["text"], encoding="utf-8")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg: TrainConfig = OmegaConf.to_object(compose(config_name="train", overrides=[
            "data=text_files", f"data.data_files={tmp_path / 'corpus'}", "tokenizer.vocab_size=300"]))
    prepared = prepare_data(cfg.data, cfg.tokenizer, tmp_path / "cache")
    assert (prepared.tokens_dir / "meta.json").is_file() and prepared.tokenizer_path.is_file()
    assert fsynced_after_rename(events, prepared.tokens_dir)
    assert fsynced_after_rename(events, prepared.tokenizer_path.parent)
    fsynced = {e[1] for e in events if e[0] == "fsync"}
    for f in [*prepared.tokens_dir.iterdir(), prepared.tokenizer_path]:  # each file, under its tmp name
        assert any(Path(p).name == f.name for p in fsynced), f
