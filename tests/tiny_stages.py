"""Tiny random stage directories (with the hashing text encoder) that pipeline and demo tests
sample: `save_tiny_stage` writes a runlocal base or super-resolution stage."""

import jax
import numpy as np
from flax import nnx

from imagen_jax import stages
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.models import imagen_unet

TEXT = dict(
    kind="hash", path="", dim=16, max_length=8, dtype="float32", batch_bucket=0, empty="null"
)


def random_params(unet: imagen_unet.UNetConfig, seed: int) -> dict:
    """Random parameters of the UNet's shapes, drawn with numpy (compiling the UNet's own
    initialisers takes tens of seconds on a CPU). Kernels are scaled by their fan-in, norm
    scales are near 1, everything else (biases, the zero-initialised output layers) small
    and non-zero, so that the images depend on every parameter."""
    abstract = nnx.eval_shape(lambda: imagen_unet.ImagenUNet(unet, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return noise / np.sqrt(np.prod(x.shape[:-1]))
        return 1.0 + 0.05 * noise if name == "scale" else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def save_tiny_stage(path, *, low_res, resolution, low_resolution=0, seed=0) -> str:
    """A runlocal stage directory (4 ddpm steps, guidance 3) at `path`."""
    unet = imagen_unet.make_config("runlocal", text_dim=16, low_res=low_res, efficient=low_res)
    stages.save_stage(
        str(path),
        unet=unet,
        params=random_params(unet, seed),
        diffusion=diffusion_config.diffusion_config(schedule="cosine", prediction="eps"),
        sample=diffusion_config.sample_config(sampler="ddpm", steps=4, guidance_scale=3.0),
        resolution=resolution,
        low_resolution=low_resolution,
        aug_level=0.1,
        text=TEXT,
        identity={"name": path.name},
        storage_dtype="float32",
    )
    return str(path)
