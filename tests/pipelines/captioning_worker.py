"""One process of test_captioning_jobs.py's two-process captioning job; not a test itself.

    python captioning_worker.py [caption.py flags ...]

Runs caption.py with the given flags (with --coordinator_address, --num_processes and
--process_id it joins a multi-process job, each process with one CPU device).
"""

import os
import pathlib
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # caption.py is a script at the repository root

from absl import app  # noqa: E402

import caption  # noqa: E402  (defines caption.py's flags)

if __name__ == "__main__":
    app.run(caption.main)
