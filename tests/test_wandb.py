"""W&B through Accelerate's tracker, offline: the run's transaction log is read back and checked value by value."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from omegaconf import OmegaConf

from xlab.errors import XLabError
from xlab.schema import to_container
from xlab.training.config import LoggerConfig, TrainConfig
from xlab.training.loggers import flat_config, tracker_init_kwargs, tracker_run_ids, wandb_mode

BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB-style log: 32 KiB blocks of CRC/length/type-framed chunks


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb transaction log (wandb 0.31 has no Python reader; its Go core writes it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pos, parts = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        parts = (b"" if kind in (1, 2) else parts) + data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # full, or last chunk of a record split across blocks
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def read_offline_run(run_dir: Path) -> dict:
    """Run metadata, config and history of the one `offline-run-*` dir under run_dir/wandb."""
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict = {"config": {}, "history": []}
    for r in wandb_records(log_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, project=r.run.project, group=r.run.run_group, name=r.run.display_name,
                       tags=list(r.run.tags))
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":  # without wandb's own "_step", "_runtime", "_wandb/..." items
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out["history"].append((r.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
    return out


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No API key, no netrc entry and WANDB_MODE unset: XLab must pick offline itself."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))


def run_once(run_dir: Path, logger: LoggerConfig, config: dict, rows: list[tuple[int, dict]],
             resume_ids: dict | None = None) -> dict[str, str]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(cpu=True, log_with=["wandb"])
    accelerator.init_trackers(logger.project, config=config,
                              init_kwargs=tracker_init_kwargs(logger, run_dir, resume_ids))
    for step, row in rows:
        accelerator.log(row, step=step)
    ids = tracker_run_ids(accelerator)
    accelerator.end_training()
    # wandb's service process writes the transaction log on its own; finish() can return before the log is flushed
    # (seen under load in CI: a resumed segment read with no history yet). teardown() waits for the service to exit.
    import wandb

    wandb.teardown()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return ids


def test_offline_run_logs_config_and_metrics_and_resumes_the_same_run(
    no_credentials: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    logger = LoggerConfig(trackers=["wandb"], project="xlab-test", group="grp", tags=["tiny", "test"], name="r1")
    config = flat_config(to_container(OmegaConf.structured(TrainConfig())))
    rows = [(5, {"train/loss": 7.5, "lr": 1e-3}), (10, {"train/loss": 6.25, "lr": 5e-4, "val/loss": 6.5})]
    with caplog.at_level(logging.INFO, logger="xlab.training.loggers"):
        ids = run_once(tmp_path, logger, config, rows)
    run_id = ids["wandb"]
    hints = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(hints) == 1 and "no W&B credentials" in hints[0] and f"offline-run-*-{run_id}*" in hints[0]

    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}*")
    logged = read_offline_run(first)
    assert {k: logged[k] for k in ("id", "project", "group", "name", "tags")} == {
        "id": run_id, "project": "xlab-test", "group": "grp", "name": "r1", "tags": ["tiny", "test"]}
    assert {k: logged["config"][k] for k in config} == config  # every resolved key, with its value
    assert logged["config"]["model.n_layer"] == 4 and logged["config"]["optimizer.lr"] == 3e-3
    assert logged["history"] == rows

    # resuming with the checkpoint's ids appends to the same W&B run (a second offline segment with the same id;
    # `wandb sync` uploads the segments of one run in order)
    more = [(15, {"train/loss": 6.0, "lr": 2e-4})]
    assert run_once(tmp_path, logger, config, more, resume_ids=ids) == ids
    segments = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(segments) == 2
    (second,) = [s for s in segments if s != first]
    assert read_offline_run(second)["history"] == more


def test_default_name_and_no_group_for_a_single_run(no_credentials: None, tmp_path: Path):
    run_dir = tmp_path / "2026-01-01" / "12-00-00"
    kwargs = tracker_init_kwargs(LoggerConfig(trackers=["tensorboard", "wandb"]), run_dir, None)["wandb"]
    assert kwargs["name"] == "2026-01-01/12-00-00" and "group" not in kwargs and "entity" not in kwargs
    assert kwargs["dir"] == str(run_dir) and kwargs["mode"] == "offline" and kwargs["resume"] == "allow"
    assert tracker_init_kwargs(LoggerConfig(trackers=["tensorboard"]), run_dir, None) == {}


def test_mode_follows_credentials_and_refuses_online_without_them(
    no_credentials: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert wandb_mode(LoggerConfig()) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(LoggerConfig()) == "online"  # `wandb login` was run: log online
    assert wandb_mode(LoggerConfig(mode="offline")) == "offline"
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig()) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(XLabError, match="no API key"):
        wandb_mode(LoggerConfig(mode="online"))
    with pytest.raises(XLabError, match="valid: online, offline, disabled"):
        wandb_mode(LoggerConfig(mode="cloud"))


def test_cli_sweep_runs_share_a_group_and_resume_continues_the_run(no_credentials, tmp_path: Path):
    """Through the real CLI: a 2-job sweep with logger=wandb, no credentials → offline runs grouped by the sweep dir;
    then one job resumed with more steps logs to the same W&B run id."""
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY if not a.startswith(("model.n_layer=", "logger="))]
    common = [*tiny, "logger=wandb", "logger.tags=[tiny]", "trainer.eval_batches=1", "trainer.log_every=2",
              "trainer.eval_tasks=[xlab_cloze]", "trainer.eval_tasks_limit=8"]
    proc = run_cli("train", "-m", "model.n_layer=1,2", *common, "trainer.max_steps=4", f"hydra.sweep.dir={sweep}")
    assert (proc.stdout + proc.stderr).count("wandb sync") == 2  # once per job
    runs = []
    for job in ("0", "1"):
        (segment,) = (sweep / job / "wandb").glob("offline-run-*")
        logged = read_offline_run(segment)
        metrics = [json.loads(x) for x in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        assert logged["group"] == f"{tmp_path.name}/sweep" and logged["name"] == f"sweep/{job}"
        assert logged["tags"] == ["tiny"] and logged["config"]["model.n_layer"] == int(job) + 1
        assert [s for s, _ in logged["history"]] == [2, 4]
        for key in ("val/loss", "tasks/xlab_cloze/acc"):  # an in-loop task's accuracy beside val loss
            assert logged["history"][-1][1][key] == [m for m in metrics if key in m][-1][key]
        runs.append(logged)
    assert runs[0]["id"] != runs[1]["id"]
    assert "| xlab_cloze/acc |" in (sweep / "summary.md").read_text()  # the sweep table shows the in-loop task
    state = json.loads((sweep / "0" / "checkpoints" / "last" / "state.json").read_text())
    assert state["trackers"] == {"wandb": runs[0]["id"]}

    # resume job 0 (in its own dir) for two more steps: same W&B run id, a second offline segment
    run_cli("train", "model.n_layer=1", *common, "trainer.max_steps=6", "resume=auto",
            f"hydra.run.dir={sweep / '0'}")
    segments = sorted((sweep / "0" / "wandb").glob(f"offline-run-*-{runs[0]['id']}*"))
    assert len(segments) == 2
    histories = sorted([s for s, _ in read_offline_run(seg)["history"]] for seg in segments)
    assert histories == [[2, 4], [6]]
    assert {read_offline_run(seg)["id"] for seg in segments} == {runs[0]["id"]}
