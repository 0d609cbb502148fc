"""Training: the train state, the jitted train step, checkpoints and the loop.

    from imagen_jax.training import train_and_evaluate
    state, metrics = train_and_evaluate(config, workdir)  # config: configs/*.py

`train.py` is the command line. The modules, in the order the loop uses them:
  config.py         the trainer's config groups (model, data, optim, train, evals, mesh)
                    and `check_config`; the text group is `imagen_jax.text.config.text_config`
  input.py          data sources and the per-process pipeline; stage/data consistency checks
  text_cache.py     builds a config's text-embedding cache (`python -m ...training.text_cache`)
  state.py          TrainState (created sharded), optimizer and schedule, EMA
  step.py           the jitted train step: CFG dropout, noise augmentation, loss, update
  aux_losses.py     named auxiliary loss terms a config plugs into the step
  latent_space.py   latent stages (model.family "sd_unet" / "mmdit"): the frozen VAE
  checkpoint.py     Orbax checkpoints of state, data iterator and model signature
  metrics.py        metrics.jsonl, TensorBoard (if tensorboardX is installed), progress bar
  sample_grid.py    the periodic sample grid from the EMA weights
  periodic_eval.py  the periodic evaluation (sample the evaluation prompts, score them)
  loop.py           what every stage's run shares: mesh, state, global batch, train_loop
  trainer.py        train_and_evaluate
  vae_step.py       the autoencoder's step (model.family "vae"): reconstruction + KL
  vae_trainer.py    train_vae (train_and_evaluate dispatches to it)
  caption_step.py   the captioner's step (model.family "git"): next-token cross-entropy
  caption_trainer.py  train_captioner (train_and_evaluate dispatches to it), its export
  export.py         a run's weights as a stage directory, a diffusers vae/ directory or a
                    Hugging Face GIT directory
"""

from imagen_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from imagen_jax.training.config import (
    check_config,
    data_config,
    default_mesh,
    evals_config,
    latent_config,
    model_config,
    network_config,
    optim_config,
    train_config,
    unet_config,
    vae_loss_config,
)
from imagen_jax.training.input import SyntheticSource, make_input, make_source
from imagen_jax.training.loop import PREEMPTED_EXIT_CODE, Preempted, make_mesh
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
from imagen_jax.training.step import make_train_step
from imagen_jax.training.trainer import train_and_evaluate

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointMismatchError",
    "Checkpointer",
    "Network",
    "NonFiniteLossError",
    "Preempted",
    "SyntheticSource",
    "TrainState",
    "check_config",
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
    "make_train_step",
    "model_config",
    "network_config",
    "optim_config",
    "train_and_evaluate",
    "train_config",
    "unet_config",
    "vae_loss_config",
]
