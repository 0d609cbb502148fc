"""Serves the web demo: text to image with the shipped model and any stage sets given.

    python demo.py                                  # the shipped model, http://127.0.0.1:7860
    python demo.py --pipeline=runs/stages           # and a folder of exported stages
    python demo.py --pipeline=base_dir,sr_dir --port=7861 --max_queue=16
    python demo.py --pipeline=models/sdxl-base,models/sdxl-refiner

--pipeline (repeatable) adds a model: a folder of stage directories (ordered by
resolution), one stage directory, a comma-separated list of them (base first), or a
diffusers SD 1.x / 2.x, SDXL (`BASE,REFINER` with a refiner) or SD 3 directory. A path
that fails to load is named in the log and left out; the rest are served. The images and
their PNG metadata are those `sample.py` writes for the same prompt, seed and settings
(the page shows the command). One request runs at a time; past --max_queue waiting
requests the page answers "queue is full".
"""

from absl import app, flags

from imagen_jax import logs
from imagen_jax.demo import app as demo_app
from imagen_jax.demo import loading as demo_loading

flags.DEFINE_multi_string("pipeline", [], "A stage set or diffusers pipeline to serve too.")
flags.DEFINE_bool("shipped", True, "Serve the shipped default model.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 7860, "Port to listen on.")
flags.DEFINE_integer("max_queue", 8, "Waiting requests beyond which the page says busy.")
flags.DEFINE_integer("batch_size", 4, "Images per compiled call (as sample.py's).")
flags.DEFINE_string("workdir", None, "Where generated PNGs go (default: a temporary folder).")
flags.DEFINE_bool("warm_up", True, "Compile each model's default setting before serving.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    f = flags.FLAGS
    models = demo_loading.load_models(f.pipeline, batch_size=f.batch_size, shipped=f.shipped)
    if not models:
        raise app.UsageError("no model loaded (see the errors above)")
    print(f"demo: serving {', '.join(models)} on http://{f.host}:{f.port}")
    demo_app.launch(
        models,
        host=f.host,
        port=f.port,
        max_queue=f.max_queue,
        workdir=f.workdir,
        warm=f.warm_up,
    )


if __name__ == "__main__":
    app.run(main)
