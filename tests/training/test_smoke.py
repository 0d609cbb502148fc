"""Every stage config, in its runlocal form, trains two steps through train_and_evaluate
and leaves a checkpoint, metrics and a sample grid in its workdir."""

import json
import math
import struct

import numpy as np
import pytest
from conftest import STAGES, stage_config
from PIL import Image

from imagen_jax.training import train_and_evaluate


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """The scalars of the TensorBoard event files in `folder`: {tag: {step: value}}, read
    from the TFRecord framing (length, CRC, Event proto, CRC) with tensorboardX's protos."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.mark.parametrize("stage", STAGES)
def test_two_steps(stage, tmp_path):
    config = stage_config(
        stage, steps=2, log_every=1, checkpoint_every=2, sample_every=2, num_samples=2
    )
    if stage == "imagen_base64":  # also covers gradient accumulation (a scan in the step)
        config.optim.accum_steps = 2
        config.data.batch_size = 16  # two micro-batches of 8 rows, one per device
    state, metrics = train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2 and math.isfinite(metrics["loss"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert lines[0]["lr"] == 0 < lines[1]["lr"]  # linear warm-up from 0
    tensorboard = read_scalars(tmp_path / "tensorboard")
    for line in lines:
        assert tensorboard["loss"][line["step"]] == pytest.approx(line["loss"], rel=1e-6)
    assert (tmp_path / "checkpoints" / "2" / "state").is_dir()
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
    rows = 2 if config.model.low_resolution else 1  # SR grids show their inputs too
    assert grid.shape == (rows * 18 + 2, 2 * 18 + 2, 3)
