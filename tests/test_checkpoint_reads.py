"""`xlab.generate` resolves its checkpoint (the directory walk that refuses links out of it) and parses its
config.yaml once per run: every loader takes the one `Checkpoint` object (xlab/checkpoint/read.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from xlab.checkpoint import layout


@pytest.mark.parametrize("extra", [[], ["prompts_from=predict", "num_prompts=2", "prompt_tokens=4"]],
                         ids=["prompt", "prompts_from"])
def test_generate_resolves_and_reads_its_checkpoint_once(extra: list[str], tiny_run: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys):
    ckpt = (tiny_run / "checkpoints" / "last").resolve()
    walks, parses = [], []
    walk, load = layout.check_links, OmegaConf.load
    monkeypatch.setattr(layout, "check_links", lambda path: (walks.append(path), walk(path))[1])
    def spy(file):  # a path (XLab's reads: /proc/self/fd/N of the opened file), or an open file (Hydra's configs)
        parses.append(Path(os.path.realpath(file)) if isinstance(file, str | Path) else Path(file.name))
        return load(file)

    monkeypatch.setattr(OmegaConf, "load", spy)
    from xlab.generate import main

    monkeypatch.setattr(sys, "argv", ["xlab.generate", f"ckpt={ckpt}", "prompt=The list", "max_new_tokens=4",
                                      f"out={tmp_path / 'samples'}", *extra])
    main()
    assert "The list" in capsys.readouterr().out or extra
    assert walks == [ckpt]
    assert [p for p in parses if p.name == "config.yaml"] == [ckpt / "config.yaml"]
