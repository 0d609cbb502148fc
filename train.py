"""Trains one cascade stage: a config file and a workdir, then `train_and_evaluate`.

    python train.py --config=configs/shapes_base.py:runlocal --workdir=/tmp/shapes_local
    python train.py --config=configs/shapes_base.py --workdir=/tmp/shapes_base \
        --config.optim.lr=1e-4
    python train.py --config=configs/shapes_vae.py:runlocal --workdir=/tmp/vae_local
    python train.py --config=configs/shapes_latent.py:runlocal --workdir=/tmp/latent_local
    python train.py --config=configs/shapes_mmdit.py:runlocal --workdir=/tmp/mmdit_local

A config whose model.family is "vae" trains an autoencoder (and writes WORKDIR/vae/); one
whose family is "sd_unet" (UNet) or "mmdit" (SD3-style, rectified flow) trains a latent
stage on the frozen VAE of its latent.vae.

Multi-host: every process runs the same command, with --coordinator_address=host:port,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID variables; on Slurm and TPU pods jax finds them itself when
--jax_distributed is set). The run resumes from the workdir's last checkpoint.

Exit status: 0 once the run has reached train.steps; 143 (128 + SIGTERM,
`training.PREEMPTED_EXIT_CODE`) when SIGTERM stopped it earlier, after it checkpointed the
step it stopped at: rerun the same command to resume (a scheduler requeues on 143); 1 on
an unknown config key or an invalid config value (one line on stderr) or any other error.
"""

import sys

from absl import app, flags, logging

from imagen_jax import logs, parallel
from imagen_jax.config_utils import ConfigError, define_config_file
from imagen_jax.training import PREEMPTED_EXIT_CODE, Preempted, check_config, train_and_evaluate

FLAGS = flags.FLAGS
define_config_file(
    "config",
    None,
    "configs/<stage>.py[:arg], e.g. configs/shapes_base.py:runlocal; --config.KEY=VALUE "
    "overrides a key (e.g. --config.train.steps=100).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
parallel.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    try:
        check_config(FLAGS.config)
    except ConfigError as e:
        sys.exit(f"FATAL config error: {e}")  # one line on stderr, exit status 1
    parallel.initialize_from_flags()
    logging.info("Config:\n%s", FLAGS.config)
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as e:  # the loop has logged where the checkpoint is
        print(
            f"train.py: stopped by signal {e.signum} at step {e.step}, checkpointed in "
            f"{FLAGS.workdir}; rerun the same command to resume (exit {PREEMPTED_EXIT_CODE})"
        )
        return PREEMPTED_EXIT_CODE
    print(f"train.py: {FLAGS.workdir} reached step {FLAGS.config.train.steps}")
    return 0


if __name__ == "__main__":
    app.run(main)
