"""Captions a folder of images with a GIT model: one line per image in captions.jsonl.

    python caption.py --model=git-base-coco --images=samples/ --outdir=captions/ \
        --num_beams=3 --max_length=20

--model is a GIT directory in Hugging Face layout (config.json, model.safetensors,
preprocessor_config.json, tokenizer.json; see docs/captioning.md). --images is a folder of
images (every file under it, recursively), or a sample.py output folder, whose
manifest.jsonl lists the images and gives each caption line its prompt and metadata. An
unreadable image is named, skipped and counted. A restarted job captions only the images
without a line; a rerun with other weights, decoding settings or images into the same
--outdir stops and says what differs, unless --overwrite. Greedy decoding with
--num_beams=1, else beam search (scores divided by length ** --length_penalty).

Multi-host: every process runs the same command with --coordinator_address=host:port,
--num_processes and --process_id (or --jax_distributed); each captions a contiguous share
of the images, and process 0 merges the lines once all are done (--outdir must be one
shared file system).
"""

import sys

from absl import app, flags

from imagen_jax import logs, parallel
from imagen_jax.pipelines import captioning_jobs

flags.DEFINE_string("model", None, "A GIT model directory (Hugging Face layout).")
flags.DEFINE_string(
    "images", None, "A folder of images, or sample.py's output folder (with manifest.jsonl)."
)
flags.DEFINE_string(
    "outdir", "captions", "Output directory (job.json, captions.jsonl); not a sampling job's."
)
flags.DEFINE_integer("batch_size", 32, "Images per compiled call (per process).")
flags.DEFINE_integer("num_beams", 1, "1: greedy decoding; more: beam search.")
flags.DEFINE_integer(
    "max_length",
    None,
    "Most tokens of a caption, its start token included (default: the model's "
    "generation_config.json max_length, else 20).",
)
flags.DEFINE_float(
    "length_penalty", 1.0, "Beam search: a hypothesis scores sum(log p) / length ** this."
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace the captions of another job in --outdir (a rerun of the same job resumes; "
    "one of another job, without this flag, stops and says what differs).",
)
flags.mark_flags_as_required(["model", "images"])
parallel.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    f = flags.FLAGS
    parallel.initialize_from_flags()
    try:
        captioning_jobs.run_captioning_job(
            model=f.model,
            images=f.images,
            outdir=f.outdir,
            batch_size=f.batch_size,
            num_beams=f.num_beams,
            max_length=f.max_length,
            length_penalty=f.length_penalty,
            overwrite=f.overwrite,
        )
    except (ValueError, OSError) as e:  # bad input: named in one line, no traceback
        sys.exit(f"caption.py: {type(e).__name__}: {e}")


if __name__ == "__main__":
    app.run(main)
