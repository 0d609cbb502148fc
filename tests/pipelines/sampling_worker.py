"""One process of test_sampling_multihost.py's sampling job; not a test itself.

    python sampling_worker.py [sample.py flags ...]

Runs sample.py with the given flags (with --coordinator_address, --num_processes and
--process_id it joins a multi-process job, each process with one CPU device), records the
PNGs this process writes, and prints them as one line "WROTE [file, ...]".
"""

import json
import os
import pathlib
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # sample.py is a script at the repository root

from absl import app  # noqa: E402

import sample  # noqa: E402  (defines sample.py's flags)
from imagen_jax.pipelines import jobs  # noqa: E402

written: list[str] = []
_write_png = jobs.write_png


def _recording_write_png(path, image, metadata):
    written.append(metadata["file"])
    _write_png(path, image, metadata)


def main(argv):
    jobs.write_png = _recording_write_png
    sample.main(argv)
    print("WROTE " + json.dumps(written), flush=True)


if __name__ == "__main__":
    app.run(main)
