"""The parts every stage config shares: all groups at their defaults, and `runlocal`.

A stage config (`configs/<stage>.py`) starts from `base_config()`, overrides what makes
the stage, and calls `runlocal(config)` for its tiny variant (used by tests and for a
first run on a laptop CPU).
"""

import ml_collections

from imagen_jax import training
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.text.config import text_config


def base_config() -> ml_collections.ConfigDict:
    """Every group at its defaults: model, diffusion, text, data, optim, train, sample,
    evals, mesh."""
    config = ml_collections.ConfigDict()
    config.model = training.model_config()
    config.diffusion = diffusion_config.diffusion_config()
    config.text = text_config()
    config.data = training.data_config()
    config.optim = training.optim_config()
    config.train = training.train_config()
    config.sample = diffusion_config.sample_config()
    config.evals = training.evals_config()
    config.mesh = training.default_mesh()
    return config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a stage config to a tiny one that trains in seconds on a CPU: the runlocal
    UNet at 16 px (8 px inputs for super-resolution), HashTextEncoder text, an in-memory
    synthetic data set, batch 8, 20 steps at a constant learning rate, a 4-step sampler."""
    low = 8 if config.model.low_resolution else 0
    extra = dict(low_res=True, efficient=True) if low else {}
    config.model = training.model_config(
        variant="runlocal", resolution=16, low_resolution=low, text_dim=32, **extra
    )
    config.diffusion.resolution = 16
    config.text = text_config(kind="hash", dim=32, max_length=16)
    config.data = training.data_config(
        source="synthetic", size=64, resolution=16, low_resolution=low, batch_size=8
    )
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 2
    config.optim.decay = "constant"  # the compiled step does not depend on train.steps
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.sample_every = 10
    config.train.num_samples = 2
    config.train.ema_decay = 0.99
    config.train.progress = False
    config.sample.steps = 4
    config.mesh = training.default_mesh()
    return config
