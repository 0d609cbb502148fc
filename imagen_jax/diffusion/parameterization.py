"""What a network predicts, and the conversions between predictions.

For z_t = alpha_t x0 + sigma_t eps the network predicts one of:
  eps   the noise (Ho et al. 2020)
  x0    the clean sample
  v     alpha_t eps - sigma_t x0 (Salimans & Ho 2022, "Progressive Distillation", eq. 6),
        defined for variance-preserving scales (alpha^2 + sigma^2 = 1)
  flow  the rectified-flow velocity eps - x0 (Liu et al. 2022; SD3), defined for
        flow scales (alpha + sigma = 1)

A network is trained in its own space ("vp" or "flow"). A sampler may hold its state in another
scaling of the same noise level (for example the variance-exploding z / alpha); `network_scale`
gives the factor that brings a state into the network's space, as `scale_model_input` does in
diffusers.
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "flow")
MODEL_SPACES = ("vp", "flow")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def network_scale(model_space: str, *, alpha, sigma):
    """Factor c with c * z in the network's space: VP has alpha^2 + sigma^2 = 1, flow has
    alpha + sigma = 1."""
    if model_space == "vp":
        return jnp.reciprocal(jnp.sqrt(alpha**2 + sigma**2))
    if model_space == "flow":
        return jnp.reciprocal(alpha + sigma)
    raise ValueError(f"unknown model space {model_space!r}; expected one of {MODEL_SPACES}")


def to_x0_eps(prediction: str, output, *, z_t, alpha_t, sigma_t):
    """(x0, eps) from a network output. alpha_t, sigma_t are in the network's own space."""
    if prediction == "eps":
        return (z_t - sigma_t * output) / alpha_t, output
    if prediction == "x0":
        return output, (z_t - alpha_t * output) / sigma_t
    if prediction == "v":
        return alpha_t * z_t - sigma_t * output, sigma_t * z_t + alpha_t * output
    if prediction == "flow":
        return z_t - sigma_t * output, z_t + alpha_t * output
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def target(prediction: str, *, x0, eps, alpha_t, sigma_t):
    """The regression target of a network that predicts `prediction`."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha_t * eps - sigma_t * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def eps_from_x0(x0, *, z_t, alpha_t, sigma_t):
    return (z_t - alpha_t * x0) / sigma_t


def x0_from_eps(eps, *, z_t, alpha_t, sigma_t):
    return (z_t - sigma_t * eps) / alpha_t


def v_from_x0_eps(*, x0, eps, alpha_t, sigma_t):
    return alpha_t * eps - sigma_t * x0


def split_variance(output, channels: int):
    """A learned-variance network (Nichol & Dhariwal 2021; DeepFloyd IF) emits 2C channels:
    the prediction, then v in [-1, 1] interpolating log variance between the posterior's
    beta-tilde (v = -1) and beta (v = +1). Channels are last: [B, H, W, 2C]."""
    if output.shape[-1] != 2 * channels:
        raise ValueError(
            f"learned_range variance needs {2 * channels} output channels, got {output.shape[-1]}"
        )
    return output[..., :channels], output[..., channels:]


def posterior(*, alpha, sigma, alpha_next, sigma_next):
    """q(z_next | z, x0) of a VP process from (alpha, sigma) down to (alpha_next,
    sigma_next) (Ho et al. 2020, eq. 6-7): (coef_z, coef_x0, var_large, var_small) with mean
    coef_z * z + coef_x0 * x0, var_large = beta_t and var_small = beta-tilde_t."""
    alpha_ts = alpha / alpha_next
    var_large = sigma**2 - alpha_ts**2 * sigma_next**2
    coef_z = alpha_ts * sigma_next**2 / sigma**2
    coef_x0 = alpha_next * var_large / sigma**2
    return coef_z, coef_x0, var_large, var_large * sigma_next**2 / sigma**2


def posterior_log_variance(variance: str, *, var_small, var_large, var_values=None):
    """log variance of one ancestral step: fixed_small (beta-tilde, clamped at 1e-20 as
    diffusers), fixed_large (beta), or learned_range (eq. 15 of Nichol & Dhariwal 2021)."""
    log_small = jnp.log(jnp.maximum(var_small, 1e-20))
    if variance == "fixed_small":
        return log_small
    if variance == "fixed_large":
        return jnp.log(var_large)
    if variance == "learned_range":
        frac = (var_values + 1.0) / 2.0
        return frac * jnp.log(var_large) + (1.0 - frac) * log_small
    raise ValueError(f"unknown variance type {variance!r}; expected one of {VARIANCE_TYPES}")
