"""What a checkpoint directory may make XLab do: no read or write through a symlink that leaves it, no state file that
is not plain data, no RNG state silently left unrestored, no tokenizer with ids the weights lack. Each refusal is one
`error:` line, exit code 2, with nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

RESUME = [*TINY, "trainer.max_steps=31", "trainer.eval_batches=1", "trainer.log_every=1"]


def refused(module: str, *args: str, expect: str) -> str:
    proc = run_cli(module, *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    return lines[0]


@pytest.fixture
def ckpt(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run's last checkpoint (30 steps), and a folder outside it."""
    (tmp_path / "outside").mkdir()
    ckpt = Path(shutil.copytree((tiny_run / "checkpoints" / "last").resolve(), tmp_path / "ckpt"))
    for output in [*ckpt.glob("eval_*.json"), *ckpt.glob("samples_*")]:  # earlier tests may have evaluated it
        output.unlink()
    return ckpt


def test_outputs_replace_a_symlink_instead_of_writing_through_it(ckpt: Path):
    victim = ckpt.parent / "outside" / "victim"
    victim.write_text("precious")
    for name in ("eval_val.json", "samples_predict.jsonl", "samples_predict.md"):
        (ckpt / name).symlink_to(victim)
    run_cli("evaluate", f"ckpt={ckpt}", "max_batches=1")
    run_cli("generate", f"ckpt={ckpt}", "prompts_from=predict", "num_prompts=1", "prompt_tokens=4",
            "max_new_tokens=2")
    assert victim.read_text() == "precious"
    for name in ("eval_val.json", "samples_predict.jsonl", "samples_predict.md"):
        assert not (ckpt / name).is_symlink() and (ckpt / name).stat().st_size > 0
    assert json.loads((ckpt / "eval_val.json").read_text())["tokens"] > 0


@pytest.mark.parametrize(("name", "module", "args"), [
    ("tokenizer.json", "export", []),  # the export would carry the outside file away
    ("config.yaml", "evaluate", ["max_batches=1"]),
    ("model.safetensors", "generate", ["prompt=x"]),
])
def test_a_symlink_out_of_the_checkpoint_is_refused(name: str, module: str, args: list, ckpt: Path):
    outside = ckpt.parent / "outside" / name
    shutil.move(ckpt / name, outside)  # the very same content: only where it lies is wrong
    (ckpt / name).symlink_to(outside)
    out = ckpt.parent / "export"
    line = refused(module, f"ckpt={ckpt}", *args, *([f"out={out}"] if module == "export" else []),
                   expect="outside")
    assert f"{ckpt / name}" in line and not out.exists()
    assert not any(p.name.startswith("eval_") for p in ckpt.iterdir())


@pytest.mark.parametrize(("name", "module", "args"), [
    ("tokenizer.json", "export", []),
    ("model.safetensors", "generate", ["prompt=x"]),
])
def test_a_hard_link_with_a_name_outside_the_checkpoint_is_refused(name: str, module: str, args: list, ckpt: Path):
    """A hard link is a second name of the same file: one outside the checkpoint (a planted link to a file elsewhere)
    is refused; the file's names inside the checkpoint are counted, so a copy kept there as a link would pass."""
    outside = ckpt.parent / "outside" / name
    shutil.move(ckpt / name, outside)
    os.link(outside, ckpt / name)
    out = ckpt.parent / "export"
    line = refused(module, f"ckpt={ckpt}", *args, *([f"out={out}"] if module == "export" else []),
                   expect="hard link")
    assert f"{ckpt / name}" in line and "outside" in line and not out.exists()
    outside.unlink()  # now both names are inside: read as usual
    os.link(ckpt / name, ckpt / f"{name}.bak")
    run_cli(module, f"ckpt={ckpt}", *args, *([f"out={out}"] if module == "export" else []))


def test_a_link_swapped_in_after_the_check_is_refused_on_the_opened_file(ckpt: Path, monkeypatch: pytest.MonkeyPatch):
    """The check-then-open race: the name is checked, then replaced by a link out before the open. opened_inside
    checks the file it actually opened (its /proc/self/fd link), so the swap is refused."""
    from xlab import fsio
    from xlab.errors import XLabError

    outside = ckpt.parent / "outside" / "state.json"
    outside.write_text("{}")
    checked = fsio.contained

    def check_then_swap(directory, name):  # the check passes on the real file; the attacker swaps it right after
        path = checked(directory, name)
        (ckpt / "state.json").unlink()
        (ckpt / "state.json").symlink_to(outside)
        return path

    monkeypatch.setattr(fsio, "contained", check_then_swap)
    with pytest.raises(XLabError, match="outside"), fsio.opened_inside(ckpt, "state.json") as opened:
        opened.read_text()


def test_links_inside_the_checkpoint_are_followed(ckpt: Path):
    (ckpt / "tokenizer.json").rename(ckpt / "tokenizer_copy.json")
    (ckpt / "tokenizer.json").symlink_to("tokenizer_copy.json")
    run_cli("export", f"ckpt={ckpt}", f"out={ckpt.parent / 'export'}")
    assert not (ckpt.parent / "export" / "tokenizer.json").is_symlink()


def test_resume_refuses_a_relative_link_out_of_the_checkpoint(ckpt: Path):
    shutil.move(ckpt / "optimizer.bin", ckpt.parent / "outside" / "optimizer.bin")
    (ckpt / "optimizer.bin").symlink_to("../outside/optimizer.bin")
    run = ckpt.parent / "run"
    refused("train", *RESUME, f"resume={ckpt}", f"hydra.run.dir={run}", expect="optimizer.bin")
    assert not run.exists()  # refused before Hydra created the run dir


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['XLAB_PWNED']}",))


def plant(path: Path, obj: object, marker: Path, save=torch.save) -> None:
    os.environ["XLAB_PWNED"] = str(marker)
    try:
        save(obj, path)
    finally:
        del os.environ["XLAB_PWNED"]


@pytest.mark.parametrize("damage", ["code", "truncated", "missing", "not RNG states"])
def test_a_bad_rng_file_is_refused_naming_the_escape(damage: str, ckpt: Path):
    rng, marker = ckpt / "random_states_0.pkl", ckpt.parent / "pwned"
    if damage == "code":
        plant(rng, {"random_state": Payload()}, marker)
    elif damage == "truncated":
        rng.write_bytes(rng.read_bytes()[:4000])
    elif damage == "missing":
        rng.unlink()
    else:
        torch.save({"random_state": 1, "numpy_random_seed": 2, "torch_manual_seed": torch.zeros(3)}, rng)
    run = ckpt.parent / "run"
    line = refused("train", *RESUME, f"resume={ckpt}", f"hydra.run.dir={run}", expect="random_states_0.pkl")
    assert "resume_rng=false" in line and not marker.exists() and not run.exists()


def test_resume_rng_false_resumes_without_the_rng_file(ckpt: Path):
    (ckpt / "random_states_0.pkl").write_bytes(b"garbage")
    run = ckpt.parent / "run"
    proc = run_cli("train", *RESUME, f"resume={ckpt}", "resume_rng=false", f"hydra.run.dir={run}")
    assert "resumed from" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "step_000031" / "random_states_0.pkl").is_file()


def dcp_dir(directory: Path, state: dict) -> None:
    """A sharded state directory as Accelerate's FSDP save writes it (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory), no_dist=True)


def test_sharded_state_is_read_as_plain_data(ckpt: Path):
    marker = ckpt.parent / "pwned"
    # A real DCP directory (tensors and plain values) passes the allow-list: the resume goes on.
    dcp_dir(ckpt / "optimizer_0", {"w": torch.ones(3), "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]})
    run_cli("train", *RESUME, f"resume={ckpt}", f"hydra.run.dir={ckpt.parent / 'ok'}")
    # A non-tensor item that would run code when DCP torch.loads it with weights_only=False.
    os.environ["XLAB_PWNED"] = str(marker)
    try:
        dcp_dir(ckpt / "pytorch_model_fsdp_0", {"w": torch.ones(3), "extra": Payload()})
    finally:
        del os.environ["XLAB_PWNED"]
    refused("train", *RESUME, f"resume={ckpt}", f"hydra.run.dir={ckpt.parent / 'item'}", expect="extra")
    # Metadata whose pickle would run code.
    shutil.rmtree(ckpt / "pytorch_model_fsdp_0")
    plant(ckpt / "optimizer_0" / ".metadata", Payload(), marker, lambda obj, path: path.write_bytes(pickle.dumps(obj)))
    refused("train", *RESUME, f"resume={ckpt}", f"hydra.run.dir={ckpt.parent / 'meta'}", expect=".metadata")
    assert not marker.exists(), "the pickled code ran"


def grow_tokenizer(ckpt: Path, extra: int = 50) -> None:
    """The tokenizer.json of a run with a larger vocabulary than these weights."""
    data = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab.update({f"zz_extra_{i}": len(vocab) + i for i in range(extra)})
    (ckpt / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("module", "args"), [
    ("generate", ["prompt=The"]), ("evaluate", ["max_batches=1"]), ("export", []), ("export", ["format=hf"]),
])
def test_a_tokenizer_larger_than_the_weights_is_refused(module: str, args: list, ckpt: Path):
    grow_tokenizer(ckpt)
    out = ckpt.parent / "export"
    refused(module, f"ckpt={ckpt}", *args, *([f"out={out}"] if module == "export" else []),
            expect="embedding rows")
    assert not out.exists()
