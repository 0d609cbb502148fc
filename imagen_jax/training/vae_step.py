"""The autoencoder's train step: reconstruction + KL, one jitted update (state donated).

    train_step = make_vae_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
    state, metrics = train_step(state, rest, batch)   # batch: {"image": uint8 [B, H, W, 3]}

The loss is the KL-regularized autoencoder objective of latent diffusion's first stage
(Rombach et al. 2022, sec. 3 and appendix G) without its perceptual and adversarial terms:

    L = mean_{B, H, W, C} |x - D(z)|^p + kl_weight * KL(q(z | x) || N(0, I)) / (H W C),

p = 1 (`vae_loss.reconstruction = "l1"`) or 2 ("l2"), z a sample of the posterior q(z | x)
(`vae_loss.sample_posterior`; else its mode) drawn from fold_in(state.rng, step). Both terms
are per pixel value: LDM sums both over the image and the latent, which is this loss times
H W C, so its kl_weight of 1e-6 means the same here.

`vae_loss.latent_noise = s > 0` decodes z + u s std(z) n instead, n ~ N(0, I), u ~ U(0, 1)
per example, std(z) the batch's (no gradient; the exported scaling_factor is 1 / the std of
the posterior means, so s is about the noise's largest std in the units a latent stage
samples in): the decoder learns to draw from latents as far off as a sampler leaves them,
and the encoder to keep what matters above that noise. 0 (default) is LDM's loss.

Gradient accumulation (`optim.accum_steps`), the optimizer, clipping and the EMA are the
diffusion step's (`step.make_grad_fn`, `step.make_update`). Metrics: those of
`step.make_train_step` and rec_loss (the reconstruction term) and kl (nats per example).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib

RECONSTRUCTION = ("l1", "l2")


def vae_loss(
    model,
    images,
    key,
    *,
    reconstruction: str,
    kl_weight: float,
    sample_posterior: bool,
    latent_noise: float = 0.0,
):
    """(loss, {"rec_loss", "kl"}) of `model` (an AutoencoderKL) on uint8 images [B, H, W, 3]."""
    if reconstruction not in RECONSTRUCTION:
        raise ValueError(
            f"vae_loss.reconstruction={reconstruction!r}; expected one of {RECONSTRUCTION}"
        )
    if not latent_noise >= 0:
        raise ValueError(f"vae_loss.latent_noise={latent_noise!r}; must be >= 0")
    x = step_lib.to_float_image(images)  # [B, H, W, 3] in [-1, 1]
    posterior = model.encode(x)
    z = posterior.sample(key) if sample_posterior else posterior.mode()
    if latent_noise:  # its own stream: the default loss draws exactly what it drew before
        level_key, noise_key = jax.random.split(jax.random.fold_in(key, 1))
        level = latent_noise * jax.random.uniform(level_key, (z.shape[0],) + (1,) * (z.ndim - 1))
        scale = jax.lax.stop_gradient(jnp.std(z.astype(jnp.float32)))
        z = z + (level * scale * jax.random.normal(noise_key, z.shape)).astype(z.dtype)
    error = model.decode(z).astype(jnp.float32) - x
    error = jnp.abs(error) if reconstruction == "l1" else jnp.square(error)
    rec = jnp.mean(error, axis=(1, 2, 3))  # [B]
    kl = posterior.kl().astype(jnp.float32)  # [B], summed over the latent
    loss = jnp.mean(rec + kl_weight * kl / x[0].size)
    return loss, {"rec_loss": jnp.mean(rec), "kl": jnp.mean(kl)}


def make_vae_train_step(config, net: state_lib.Network, tx, lr_schedule, mesh, shardings, rest):
    """The jitted `train_step(state, rest, batch) -> (state, metrics)`; state donated."""
    loss_kwargs = dict(config.vae_loss)

    def loss_fn(params, rest, batch, key):
        return vae_loss(net.merge(params, rest), batch["image"], key, **loss_kwargs)

    grad_fn = step_lib.make_grad_fn(loss_fn, config.optim.accum_steps, with_aux=True)
    update = step_lib.make_update(config, tx, lr_schedule)

    def train_step(state: state_lib.TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, aux, grads = grad_fn(state.params, rest, batch, key)
        state, metrics = update(state, loss, grads)
        return state, {**metrics, **aux}

    return step_lib.jit_step(train_step, mesh, shardings, rest)
