"""metrics.jsonl of a resumed run: the lines after the restored step (logged before a kill,
logged again after the resume) and a line cut short by the kill are dropped first."""

import json

from imagen_jax.training import metrics as metrics_lib

KILLED = (
    '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 2, "eval/fid": 30.0}\n'
    '{"step": 3, "loss": 0.8}\n{"step": 4, "loss": 0.7}\n{"step": 5, "lo'
)


def _writer(workdir, start_step):
    return metrics_lib.MetricWriter(
        str(workdir), total_steps=10, start_step=start_step, batch_size=2, progress=False
    )


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_the_lines_after_the_restored_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(KILLED)
    writer = _writer(tmp_path, start_step=2)  # resumed from the checkpoint of step 2
    writer.write(3, {"loss": 0.5})
    writer.close()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 2, 3]
    assert records[2] == {"step": 2, "eval/fid": 30.0}  # an evaluation of a kept step stays
    assert records[3]["loss"] == 0.5


def test_a_line_cut_short_is_dropped_even_with_nothing_after_the_restored_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 1, "eval/')
    assert metrics_lib.truncate_metrics(str(tmp_path / "metrics.jsonl"), 5) == 1
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_new_run_keeps_no_lines_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(KILLED)
    _writer(tmp_path, start_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_whole_file_is_left_as_it_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n')
    before = path.stat().st_mtime_ns
    assert metrics_lib.truncate_metrics(str(path), 1) == 0
    assert path.stat().st_mtime_ns == before
    assert metrics_lib.truncate_metrics(str(tmp_path / "missing.jsonl"), 1) == 0
    assert not (tmp_path / "missing.jsonl").exists()
