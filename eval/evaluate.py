"""Runs the evaluators the trainer runs (`imagen_jax/evaluation/evaluators.py`) over a folder
of samples with its manifest, or over stages sampled on the fly; prints the metrics as JSON.

    # a folder written by sample.py (images + manifest.jsonl)
    python eval/evaluate.py --samples=DIR --metrics=compositional,fid,clip_score \\
        --fid_inception=pt_inception-2015-12-05-6726825d.pth --fid_reference=REF.npz \\
        --clip=DIR_OF_A_CLIP_MODEL [--json=OUT.json]
    # sample first (as sample.py does, resumable), then evaluate
    python eval/evaluate.py --stage=checkpoints/shapes/base --prompts=shapes:heldout \\
        --prompts_per_task=60 --images_per_prompt=4 --outdir=runs/eval/base

--prompts is a shapes evaluation split ("shapes:heldout", "shapes:train") or a prompt file;
the report names every evaluator's weights and conventions, and the image count.
"""

import json

from absl import app, flags

from imagen_jax import logs
from imagen_jax.evaluation import evaluators, inception
from imagen_jax.pipelines import jobs, sampling
from imagen_jax.training import config as config_lib
from imagen_jax.training import periodic_eval as evaluation

_SAMPLES = flags.DEFINE_string("samples", None, "Folder of samples with manifest.jsonl.")
_STAGE = flags.DEFINE_multi_string("stage", [], "Sample these stage directories (base first).")
_OUTDIR = flags.DEFINE_string("outdir", None, "With --stage: where the samples are written.")
_PROMPTS = flags.DEFINE_string(
    "prompts", "shapes:heldout", "With --stage: shapes:heldout, shapes:train or a prompt file."
)
_PER_TASK = flags.DEFINE_integer("prompts_per_task", 60, "shapes:<split>: prompts per task.")
_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 1, "With --stage: images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "With --stage: the job's seed.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "With --stage: images per compiled call.")
_METRICS = flags.DEFINE_list(
    "metrics", ["compositional"], f"Evaluators to run: {', '.join(evaluators.EVALUATORS)}."
)
_FID_INCEPTION = flags.DEFINE_string("fid_inception", "", "FID Inception weights file.")
_FID_REFERENCE = flags.DEFINE_string("fid_reference", "", "Reference statistics .npz.")
_KID_REFERENCE = flags.DEFINE_string("kid_reference", "", "Reference features .npz (KID).")
_RESIZE = flags.DEFINE_enum("resize", "pytorch_fid", inception.RESIZE_MODES, "FID resize.")
_CLIP = flags.DEFINE_string("clip", "", "A Hugging Face CLIPModel directory (clip_score).")
_JSON = flags.DEFINE_string("json", None, "Also write the report here.")


def evals_from_flags():
    evals = config_lib.evals_config(
        metrics=tuple(_METRICS.value),
        prompts=_PROMPTS.value,
        prompts_per_task=_PER_TASK.value,
        images_per_prompt=_PER_PROMPT.value,
        seed=_SEED.value,
    )
    evals.fid.inception = _FID_INCEPTION.value
    evals.fid.reference = _FID_REFERENCE.value
    evals.fid.kid_reference = _KID_REFERENCE.value
    evals.fid.resize = _RESIZE.value
    evals.clip.path = _CLIP.value
    return evals


def main(argv):
    del argv
    logs.quiet_logs()
    if bool(_SAMPLES.value) == bool(_STAGE.value):
        raise app.UsageError("give either --samples=DIR or --stage=DIR (and --outdir)")
    evals = evals_from_flags()
    chosen = evaluators.make_evaluators(evals)  # weights load before any sampling
    folder = _SAMPLES.value
    if _STAGE.value:
        if not _OUTDIR.value:
            raise app.UsageError("--stage needs --outdir (where the samples are written)")
        cascade, loaded = sampling.load_cascade(_STAGE.value, mesh=jobs.local_mesh(_BATCH.value))
        entries, _ = evaluation.eval_prompts(evals)
        jobs.check_outdir(_OUTDIR.value)
        jobs.run_job(
            cascade,
            entries,
            _OUTDIR.value,
            images_per_prompt=_PER_PROMPT.value,
            seed=_SEED.value,
            batch_size=_BATCH.value,
            settings={"stages": [s.settings() for s in loaded]},
        )
        folder = _OUTDIR.value
    samples = evaluators.samples_from_folder(folder)
    report = {
        "samples": folder,
        "num_images": len(samples),
        "evaluators": [e.describe() for e in chosen],
        "metrics": evaluators.run_evaluators(chosen, samples),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
