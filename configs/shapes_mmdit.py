"""An SD3-style latent stage for the shapes domain: our MMDiT (SD 3.5's block with RMS
query-key norm, scaled down) trained with rectified flow on the latents of a frozen shapes
VAE, conditioned on all-MiniLM-L6-v2 (384-dim tokens, the MMDiT's joint_attention_dim).

    python train.py --config=configs/shapes_vae.py --workdir=/tmp/shapes_vae   # writes vae/
    python train.py --config=configs/shapes_mmdit.py:vae=/tmp/shapes_vae/vae \
        --workdir=/tmp/shapes_mmdit
    python train.py --config=configs/shapes_mmdit.py:runlocal --workdir=/tmp/shapes_mmdit_local
    python -m imagen_jax.training.export --config=configs/shapes_mmdit.py:vae=/tmp/shapes_vae/vae \
        --workdir=/tmp/shapes_mmdit --outdir=/tmp/shapes_mmdit_stage   # sample.py --stage

As SD3 (Esser et al. 2024): z_t = (1 - t) x0 + t eps, the network predicts the velocity
eps - x0, t drawn logit-normal (mean 0, std 1) with the resolution shift `shift` (SD3 uses
3.0 at 1024 px; 1.0 here, for 16x16 latents), the unweighted velocity loss; the network is
told t * 1000; the network starts from DiT's adaLN-Zero initialization (`model.adaln_zero`:
every block the identity, the prediction zero; diffusers' SD3 draws those layers as any
other). Sampling: flow-matching Euler, 28 steps. Classifier-free guidance dropout
swaps the text for learned null tokens (`models/latent_mmdit.py`). The captions use the
training wordings (`wordings=train`: the grammar's and the templates of
imagen_jax/shapes/wordings.py marked for training; the held-out ones never), and the scenes
are drawn on five canvases, the square and four of about res^2 pixels up to 11:6 wide or
tall (`buckets=auto`, `bucket_shapes`; `buckets=` trains squares only), every batch of one
canvas. `patch=1` cuts the latents into 1x1 patches instead of 2x2 (256 image tokens at
64 px instead of 64, about 4x the step's operations). Everything else (VAE, data,
optimizer) is `configs/shapes_latent.py`'s. Periodic evaluation is configured as
configs/shapes_base.py's (`shapes_config`: compositional accuracy on the held-out shapes
prompts), off until `evals.every` is set (`--config.evals.every=2000`); it samples the
MMDiT's latents with the stage's flow-matching Euler sampler and decodes them with the VAE,
as sample.py samples the exported stage.
"""

from configs import common, shapes_base, shapes_latent
from imagen_jax import training
from imagen_jax.config_utils import parse_arg


def get_config(arg=None):
    arg = parse_arg(
        arg,
        runlocal=False,
        res=64,
        batch=32,
        steps=100_000,
        vae="",
        shift=1.0,
        fsdp=1,
        buckets="auto",
        wordings="train",
        patch=2,
    )
    config = shapes_base.shapes_config(res=arg.res, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp)
    # Aspect-ratio buckets: scenes drawn on wide and tall canvases of about res^2 pixels
    # (the shapes source draws each record on one of them), so the stage samples those
    # sizes as it samples the square; "" trains squares only.
    config.data.buckets = bucket_shapes(arg.res) if arg.buckets == "auto" else arg.buckets
    # The caption templates beyond the grammar's (imagen_jax/shapes/wordings.py); the
    # held-out templates stay out of training either way.
    config.data.wordings = arg.wordings
    config.model = training.model_config(
        family="mmdit",
        variant="shapes_mmdit",
        resolution=arg.res,
        in_channels=4,  # the VAE's latent_channels
        out_channels=4,
        joint_attention_dim=384,
        adaln_zero=True,  # DiT's initialization: blocks start as the identity
        patch_size=arg.patch,  # 2: 64 tokens of 16x16 latents; 1: 256
    )
    config.latent = training.latent_config(vae=arg.vae, sample_posterior=True)
    config.diffusion.resolution = arg.res
    shapes_latent.rectified_flow(config, arg.shift)
    if arg.runlocal:
        common.runlocal(config)
        config.data.buckets = ""
        config.model = training.model_config(
            family="mmdit", variant="runlocal", resolution=16, joint_attention_dim=32
        )
        config.latent.vae = arg.vae or "random"
        config.sample.sampler = "flow_euler"
        config.sample.spacing = "linspace"
    return config


def bucket_shapes(res: int, step: int = 8) -> str:
    """The square and four canvases of about res^2 pixels with sides multiples of `step`
    (the VAE's factor x the patch size): for 64, "64x64,56x72,72x56,48x88,88x48" (aspect
    ratios 1, 9:7 and 11:6, both ways)."""
    shapes = [(res, res)]
    for h in (res - step, res - 2 * step):
        w = round(res * res / h / step) * step
        shapes += [(h, w), (w, h)]
    return ",".join(f"{h}x{w}" for h, w in shapes)
