"""Training: the train state, the jitted train step, checkpoints and the loop.

    from imagen_jax.training import train_and_evaluate
    state, metrics = train_and_evaluate(config, workdir)  # config: configs/*.py

`train.py` is the command line. The modules, in the order the loop uses them:
  config.py      the trainer's config groups (model, text, data, optim, train, evals, mesh)
  input.py       data sources and the per-process pipeline; stage/data consistency checks
  text.py        the TextEncoder protocol, HashTextEncoder, the real encoders (lazily)
  text_cache.py  builds a config's text-embedding cache (`python -m ...training.text_cache`)
  state.py       TrainState (created sharded), optimizer and schedule, EMA
  step.py        the jitted train step: CFG dropout, noise augmentation, loss, update
  latent.py      latent stages (model.family "sd_unet" / "mmdit"): the frozen VAE, images -> latents
  checkpoint.py  Orbax checkpoints of state, data iterator and model signature
  metrics.py     metrics.jsonl, TensorBoard (if tensorboardX is installed), progress bar
  sampling.py    the periodic sample grid from the EMA weights
  trainer.py     train_and_evaluate
  vae_step.py    the autoencoder's step (model.family "vae"): reconstruction + KL
  vae_trainer.py train_vae (train_and_evaluate dispatches to it) and the diffusers export
"""

from imagen_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from imagen_jax.training.config import (
    data_config,
    default_mesh,
    evals_config,
    latent_config,
    model_config,
    network_config,
    optim_config,
    text_config,
    train_config,
    unet_config,
    vae_loss_config,
)
from imagen_jax.training.input import SyntheticSource, make_input, make_source
from imagen_jax.training.metrics import NonFiniteLossError
from imagen_jax.training.state import (
    Network,
    TrainState,
    create_train_state,
    ema_decay,
    make_lr_schedule,
    make_network,
    make_optimizer,
)
from imagen_jax.training.step import make_train_step, model_fn, unit_time
from imagen_jax.training.text import HashTextEncoder, TextEncoder, make_text_encoder
from imagen_jax.training.trainer import make_mesh, train_and_evaluate

__all__ = [
    "CheckpointMismatchError",
    "Checkpointer",
    "HashTextEncoder",
    "Network",
    "NonFiniteLossError",
    "SyntheticSource",
    "TextEncoder",
    "TrainState",
    "create_train_state",
    "data_config",
    "default_mesh",
    "ema_decay",
    "evals_config",
    "latent_config",
    "make_input",
    "make_lr_schedule",
    "make_mesh",
    "make_network",
    "make_optimizer",
    "make_source",
    "make_text_encoder",
    "make_train_step",
    "model_config",
    "model_fn",
    "network_config",
    "optim_config",
    "text_config",
    "train_and_evaluate",
    "train_config",
    "unet_config",
    "unit_time",
    "vae_loss_config",
]
