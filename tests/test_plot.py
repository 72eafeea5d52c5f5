"""`python -m xlab.plot` on real runs: a PNG of the curves of two runs overlaid; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, run_cli

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours: run 1, run 2


def near(pixel: tuple[int, ...], color: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel[:3], color))


def test_plot_two_runs_overlaid(tiny_run: Path, tmp_path: Path):
    from PIL import Image

    second = tmp_path / "second"
    run_cli("train", *TINY, "model.n_layer=1", "trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_every=3",
            "trainer.eval_batches=1", f"hydra.run.dir={second}")
    out = tmp_path / "curves.png"
    proc = run_cli("plot", str(tiny_run), str(second), "--out", str(out))
    assert proc.stdout.strip() == f"wrote {out} (2 runs)"

    image = Image.open(out).convert("RGB")
    assert image.size == (1300, 1720)  # 13 x 17.2 inches at 100 dpi: 5 metrics x (vs step, vs tokens)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50, "blank image"
    pixels = [(count, rgb) for count, rgb in colors]
    # both runs are drawn (one colour each), not just the axes
    assert sum(c for c, rgb in pixels if near(rgb, BLUE)) > 500
    assert sum(c for c, rgb in pixels if near(rgb, ORANGE)) > 500
    white = sum(c for c, rgb in pixels if rgb == (255, 255, 255))
    assert 0.3 < white / (image.size[0] * image.size[1]) < 0.98

    # the default output is curves.png in the first run dir
    run_cli("plot", str(second))
    assert Image.open(second / "curves.png").size == (1300, 1720)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "has no metrics.jsonl"),  # a dir that is neither a run nor a sweep
    ],
)
def test_plot_bad_input_is_one_line(tmp_path: Path, make, expected):
    proc = run_cli("plot", str(make(tmp_path)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr


def test_plot_refuses_a_non_png_output(tiny_run: Path, tmp_path: Path):
    proc = run_cli("plot", str(tiny_run), "--out", str(tmp_path / "curves.jpg"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out") and "Traceback" not in proc.stderr
