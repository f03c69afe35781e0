"""One study run through the runner (the CLI path), in this process: its summary against TensorBoard and the
checkpoints, and a run the CLI refuses."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flatminima import cli
from flatminima.studies import runner
from flatminima.studies.spec import parse

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_study_run_summary_equals_tensorboard_and_the_checkpoints(tmp_path):
    """One run through the runner (the CLI path): sharpness at a LossThresholdCheckpoint schedule."""
    measures = tmp_path / "measures.yaml"
    measures.write_text("""trainer:
  callbacks+:
    - class_path: flatminima.callbacks.LossThresholdCheckpoint
      init_args: {threshold: 10.0, every_n_epochs: 1}
    - class_path: flatminima.callbacks.AdaptiveSharpness
      init_args: {rho: 0.05, method: pga, n_iters: 2, num_samples: 64, batch_size: 32}
""")
    study = parse(
        {
            "base": [
                str(cli.ROOT / "configs/data/moons.yaml"),
                str(cli.ROOT / "configs/model/mlp.yaml"),
                str(cli.ROOT / "configs/optim/sgd.yaml"),
                str(measures),
            ],
            "overrides": {"trainer.max_epochs": 3, "data.init_args.num_samples": 200},
            "axes": {"rule": {"sam": str(cli.ROOT / "configs/minimizer/sam.yaml")}},
            "seeds": [4],
        }
    )
    (run,) = study.runs()
    result = runner.run_task(runner.make_task(run, tmp_path / "out", threads=1, cwd=tmp_path))
    assert result.status == "finished", result.error
    folder = tmp_path / "out" / "runs" / run.id
    s = json.loads((folder / "summary.json").read_text())
    assert s == result.summary and s["id"] == "rule=sam-seed=4" and s["axes"] == {"rule": "sam"} and s["seed"] == 4
    assert s["config"] == "config.yaml" and (folder / "config.yaml").is_file() and (folder / "log.txt").is_file()
    tb = scalars(folder)
    for key in ("train/loss", "train/acc", "val/loss", "test/acc", "test/loss", "sharpness/adaptive"):
        assert s["metrics"][key] == tb[key][-1][1], key
    assert [(x["step"], x["value"]) for x in s["sharpness"] if x["key"] == "sharpness/adaptive"] == tb[
        "sharpness/adaptive"
    ]
    # threshold 10 is reached at epoch 0; then a save (and a measurement) every epoch, with the values inside
    assert s["threshold_epoch"] == 0
    checkpoints = {
        torch.load(p, weights_only=False)["epoch"]: torch.load(p, weights_only=False)
        for p in (folder / "checkpoints").glob("*.ckpt")
    }
    adaptive = [x for x in s["sharpness"] if x["key"] == "sharpness/adaptive"]
    assert [x["epoch"] for x in adaptive] == [0, 1, 2]
    for x in adaptive:
        ckpt = next(c for c in checkpoints.values() if c.get("loss_threshold", {}).get("epoch") == x["epoch"])
        assert ckpt["loss_threshold"]["threshold_epoch"] == 0
        # the checkpoint keeps the float64 measurement; logged values are float32 (as TensorBoard keeps them)
        assert x["value"] == pytest.approx(ckpt["sharpness"]["sharpness/adaptive"], rel=1e-7, abs=0)
        assert x["value"] == float(torch.tensor(ckpt["sharpness"]["sharpness/adaptive"], dtype=torch.float32))
    assert s["metrics"]["sharpness/adaptive@threshold"] == adaptive[0]["value"]
    assert s["metrics"]["train/loss@threshold"] == s["history"]["train/loss"][0][2]


def test_a_run_the_cli_refuses_is_recorded_failed_with_its_error_on_one_line(tmp_path):
    study = parse(
        {
            "base": [str(cli.ROOT / "configs/data/moons.yaml"), str(cli.ROOT / "configs/model/mlp.yaml")],
            "overrides": {"model.init_args.no_such_argument": 1},
        }
    )
    (run,) = study.runs()
    result = runner.run_task(runner.make_task(run, tmp_path / "out", threads=1, cwd=tmp_path))
    s = json.loads((tmp_path / "out" / "runs" / run.id / "summary.json").read_text())
    assert result.status == s["status"] == "failed" and s["id"] == "seed=0" and s["metrics"] == {}
    assert s["error"].startswith("SystemExit(2): error:") and "\n" not in s["error"]
    assert "Option 'no_such_argument' is not accepted" in s["error"]
