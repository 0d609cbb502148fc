"""How well a shapes VAE keeps what the prompts state, per image size: the scorer's pass
rate and the PSNR of round trips of rendered scenes (`imagen_jax.evaluation.vae_round_trip`),
the ceiling the VAE puts on a latent model sampled at each size.

    python tools/shapes_vae_eval.py --vae=runs/shapes_vae/vae [--sizes=64x64,48x88] [--n=48]
        [--latent_noise=0,0.2,0.5]

One JSON line per size and latent noise on stdout (and appended to --results): the noise
levels decode the means plus that many of their std of Gaussian noise, as far off as a
latent stage's sampler may leave them.
"""

import json

from absl import app, flags

from imagen_jax.data.buckets import parse_buckets
from imagen_jax.evaluation.vae_round_trip import round_trip
from imagen_jax.models import vae as vae_lib

flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL directory.", required=True)
flags.DEFINE_string("sizes", "64x64,48x88", "Image sizes HxW.")
flags.DEFINE_integer("n", 48, "Scenes per size (the six tasks in turn).")
flags.DEFINE_integer("seed", 0, "Scene seed.")
flags.DEFINE_list("latent_noise", ["0"], "Noise levels added to the latents (their std's).")
flags.DEFINE_string("results", None, "Also append the JSON lines to this file.")


def main(argv):
    del argv
    f = flags.FLAGS
    model, _ = vae_lib.load_vae(f.vae)
    levels = []
    for text in f.latent_noise:
        try:
            levels.append(float(text))
        except ValueError:
            raise app.UsageError(f"--latent_noise: {text!r} is not a number") from None
    for h, w in parse_buckets(f.sizes):
        for level in levels:
            line = dict(vae=f.vae, **round_trip(model, h, w, f.n, f.seed, latent_noise=level))
            print(json.dumps(line))
            if f.results:
                with open(f.results, "a", encoding="utf-8") as out_file:
                    out_file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    app.run(main)
