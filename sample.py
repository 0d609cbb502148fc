"""Samples images from a cascade of stages: one PNG per image with its metadata, a manifest.

    python sample.py --stage=STAGE_DIR [--stage=SR_STAGE_DIR ...] \
        --prompt="a red circle above a blue square" --images_per_prompt=4 --outdir=out/

Prompts come from --prompt (repeatable) or --prompts=FILE (.txt, one per line; or .jsonl
with per-prompt "seed", "negative_prompt", "guidance_scale"). A stage is a directory written
by `imagen_jax.pipelines.stages.save_stage` (or exported from a training workdir). A
restarted job makes only the images that are missing. --set=STAGE.KEY=VALUE (repeatable)
overrides a stage's sample settings, e.g. --set=0.steps=25 --set=1.sampler=ddim.
"""

from absl import app, flags

from imagen_jax.pipelines import sampling

flags.DEFINE_multi_string("stage", [], "Stage directories, base first.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts", None, "A prompt file (.txt or .jsonl).")
flags.DEFINE_string("negative_prompt", "", "Negative prompt for --prompt prompts.")
flags.DEFINE_integer("images_per_prompt", 1, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Job seed.")
flags.DEFINE_integer("batch_size", 4, "Images per compiled call (per process).")
flags.DEFINE_string("outdir", "samples", "Output directory.")
flags.DEFINE_multi_string("set", [], "STAGE.KEY=VALUE sample-setting overrides.")
flags.DEFINE_bool("grid", True, "Also write grid.png of the final images.")


def main(argv):
    del argv
    f = flags.FLAGS
    sampling.main(
        stages=f.stage,
        prompts=f.prompt,
        prompts_file=f.prompts,
        negative_prompt=f.negative_prompt,
        images_per_prompt=f.images_per_prompt,
        seed=f.seed,
        batch_size=f.batch_size,
        outdir=f.outdir,
        overrides=f.set,
        grid=f.grid,
    )


if __name__ == "__main__":
    app.run(main)
