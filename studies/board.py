"""The study in TensorBoard (``DIR/tensorboard``): the figures, and every run in the HParams dashboard.

``tensorboard --logdir DIR/tensorboard``: the IMAGES tab shows the figures; the HPARAMS tab lists the runs
with their axis values and seed as hyperparameters and their finite final metrics (``summary.json``) as
metrics. The folder is rewritten on each analysis.

Written with the ``tensorboard`` package's own event writer and protocol buffers (the records
``torch.utils.tensorboard``'s ``add_image`` and ``add_hparams`` write), so analysing a pool needs no torch.
"""

from __future__ import annotations

import math
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from flatminima.formats.summary import Summary

from .analysis import finite


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG image, from its header."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG image")
    return struct.unpack(">II", png[16:24])


class Board:
    """A TensorBoard folder for a study: ``with Board(DIR / "tensorboard") as board: board.add_image(...)``.

    Args:
        directory: The folder (removed first when it exists).
    """

    def __init__(self, directory: str | Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.folder = Path(directory)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self._writer = EventFileWriter(str(self.folder))

    def __enter__(self) -> Board:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def add_image(self, tag: str, png: bytes, step: int = 0) -> None:
        """One PNG image (IMAGES tab) under ``tag``."""
        from tensorboard.compat.proto.summary_pb2 import Summary as Record

        width, height = png_size(png)
        image = Record.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self._write(self._writer, Record(value=[Record.Value(tag=tag, image=image)]), step)

    def add_runs(self, runs: Sequence[Summary], axes: Sequence[str]) -> None:
        """One HParams session per run (a subfolder named by its id): axis values and seed; finite final metrics."""
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        for run in runs:
            run_axes = run.get("axes") or {}
            hparams: dict[str, Any] = {axis: str(run_axes.get(axis, "")) for axis in axes}
            if run.get("seed") is not None:
                hparams["seed"] = int(run["seed"])
            metrics = {k: finite(run, k) for k in (run.get("metrics") or {}) if "@" not in k}
            metrics = {k: v for k, v in metrics.items() if v is not None}
            writer = EventFileWriter(str(self.folder / str(run.get("id"))))
            try:
                for record in _hparams_records(hparams, metrics):
                    self._write(writer, record, 0)
                for key, v in metrics.items():
                    self._write(writer, _scalar(key, v), 0)
            finally:
                writer.close()

    @staticmethod
    def _write(writer: Any, record: Any, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        writer.add_event(Event(wall_time=time.time(), step=step, summary=record))


def _scalar(tag: str, value: float) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary as Record

    return Record(value=[Record.Value(tag=tag, simple_value=value)])


def _hparams_records(hparams: dict[str, Any], metrics: dict[str, float]) -> list[Any]:
    """The experiment, session-start and session-end records of one HParams session (as ``add_hparams``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary as Record
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for key, v in hparams.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            start.hparams[key].number_value = v
            infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value("DATA_TYPE_FLOAT64")))
        else:
            start.hparams[key].string_value = str(v)
            infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value("DATA_TYPE_STRING")))
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=k)) for k in metrics]
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"))

    def record(tag: str, **content: Any) -> Any:
        data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
        meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
        )
        return Record(value=[Record.Value(tag=tag, metadata=meta)])

    return [
        record(metadata.EXPERIMENT_TAG, experiment=experiment),
        record(metadata.SESSION_START_INFO_TAG, session_start_info=start),
        record(metadata.SESSION_END_INFO_TAG, session_end_info=end),
    ]
