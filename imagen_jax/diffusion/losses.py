"""Training losses: draw a time and noise, noise x0, regress the network onto its target.

The weighted denoising objective (Ho et al. 2020, eq. 14, with a per-time weight as in
Kingma et al. 2021, "Variational Diffusion Models", and Kingma & Gao 2023, "Understanding
Diffusion Objectives"):

    L = E_{t, eps} [ w(t) * mean_{H, W, C} f(network(z_t, t) - target) ],
    z_t = alpha_t x0 + sigma_t eps,

with the target of the network's prediction (`parameterization.target`), an element loss f
(l2 | l1 | huber) and a weighting w (uniform | min_snr | edm). Every weighting is a function of
the signal-to-noise ratio SNR = alpha_t^2 / sigma_t^2 and of the prediction type.

Converting a weighting between predictions. A weighting is defined on the x0 loss; an error
in a prediction is an error in x0 scaled by a factor k (from `parameterization.to_x0_eps`, at
fixed z_t), so w_pred = w_x0 * k^2:

    x0:    k = 1
    eps:   x0 = (z_t - sigma_t eps) / alpha_t        k^2 = sigma_t^2 / alpha_t^2 = 1 / SNR
    v:     x0 = alpha_t z_t - sigma_t v  (VP)        k^2 = sigma_t^2 = 1 / (1 + SNR)
    flow:  x0 = z_t - sigma_t u  (alpha + sigma = 1)  k^2 = sigma_t^2 = 1 / (1 + sqrt(SNR))^2

Every function here is pure `jnp`; the schedule, the prediction and the other string options
are static Python values, so close over them (`functools.partial`) before `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import parameterization as param_lib
from imagen_jax.diffusion import schedules as sched_lib

TIME_SAMPLINGS = ("uniform", "stratified", "logit_normal", "mode")
WEIGHTINGS = ("uniform", "min_snr", "edm", "sigma_sqrt", "cosmap")
# Weightings written on a rectified-flow time sigma (SD 3's `compute_loss_weighting_for_sd3`).
FLOW_WEIGHTINGS = ("sigma_sqrt", "cosmap")
LOSS_TYPES = ("l2", "l1", "huber")

# Predictions that only make sense in one space (see parameterization.py).
_PREDICTION_SPACE = {"v": "vp", "flow": "flow"}


def _unknown(kind: str, value, allowed) -> ValueError:
    return ValueError(f"unknown {kind} {value!r}; expected one of {allowed}")


def _check(kind: str, value, allowed):
    if value not in allowed:
        raise _unknown(kind, value, allowed)
    return value


def _per_example(a, like):
    """[B] -> [B, 1, ..., 1], broadcastable against `like` [B, H, W, C]."""
    return jnp.reshape(a, (-1,) + (1,) * (jnp.ndim(like) - 1))


# ----------------------------------------------------------------------------------------------
# Time sampling
# ----------------------------------------------------------------------------------------------


def schedule_space(schedule) -> str:
    """The space of a schedule's (alpha_t, sigma_t): vp (alpha^2 + sigma^2 = 1) or flow
    (alpha + sigma = 1)."""
    if isinstance(schedule, (sched_lib.DiscreteSchedule, sched_lib.LogSNRSchedule)):
        return "vp"
    if isinstance(schedule, sched_lib.FlowSchedule):
        return "flow"
    raise ValueError(
        f"unknown schedule type {type(schedule).__name__!r}; expected DiscreteSchedule, "
        "LogSNRSchedule or FlowSchedule"
    )


def sample_unit_time(
    key, batch: int, *, method="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29
):
    """u in [0, 1] per example [B].

    uniform:       u ~ U(0, 1).
    stratified:    u_i = (u_0 + i / B) mod 1, u_0 ~ U(0, 1): the low-discrepancy sampler of
                   Kingma et al. 2021 (VDM), one u in each interval [i / B, (i + 1) / B).
    logit_normal:  u = sigmoid(n), n ~ N(logit_mean, logit_std^2) (Esser et al. 2024, SD3,
                   sec. 3.1; diffusers' `compute_density_for_timestep_sampling`).
    mode:          u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1): SD3 sec.
                   3.1's mode sampling with heavy tails (the same diffusers function; its
                   training scripts' default mode_scale 1.29).
    """
    if method == "uniform":
        return jax.random.uniform(key, (batch,))
    if method == "stratified":
        u0 = jax.random.uniform(key, ())
        return jnp.mod(u0 + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    if method == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    if method == "mode":
        v = jax.random.uniform(key, (batch,))
        return 1.0 - v - mode_scale * (jnp.cos(jnp.pi * v / 2) ** 2 - 1.0 + v)
    raise _unknown("time sampling", method, TIME_SAMPLINGS)


def time_from_unit(u, *, schedule):
    """(t, alpha_t, sigma_t) at unit times u [B]: t is what the network is told.

    DiscreteSchedule: integer t = floor(u T), clipped to T - 1 (diffusers' SD3 script bins u
    the same way). LogSNRSchedule: t = u. FlowSchedule: u is shifted (SD3 eq. 23) inside
    `FlowSchedule.alpha_sigma`, sigma_t is the shifted time and the network is told
    sigma_t * T, as `time_grids.flow_grid` tells it when sampling.
    """
    schedule_space(schedule)  # raises on an unknown schedule type
    u = jnp.asarray(u, jnp.float32)
    if isinstance(schedule, sched_lib.DiscreteSchedule):
        big_t = schedule.num_train_timesteps
        t = jnp.minimum(jnp.floor(u * big_t), big_t - 1).astype(jnp.int32)
        return (t, *schedule.alpha_sigma(t))
    if isinstance(schedule, sched_lib.LogSNRSchedule):
        return (u, *schedule.alpha_sigma(u))
    alpha_t, sigma_t = schedule.alpha_sigma(u)  # FlowSchedule
    return sigma_t * schedule.num_train_timesteps, alpha_t, sigma_t


def sample_time(
    key,
    batch: int,
    *,
    schedule,
    method="uniform",
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
):
    """Training times for a batch: (t [B], alpha_t [B], sigma_t [B]) in the schedule's space.

    method: uniform | stratified | logit_normal | mode (see `sample_unit_time`). For a
    DiscreteSchedule, uniform draws integer t uniformly in [0, T) exactly (as diffusers'
    training scripts, `torch.randint`); the other methods bin a unit time (`time_from_unit`).
    """
    schedule_space(schedule)
    _check("time sampling", method, TIME_SAMPLINGS)
    if method == "uniform" and isinstance(schedule, sched_lib.DiscreteSchedule):
        t = jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps)
        return (t, *schedule.alpha_sigma(t))
    u = sample_unit_time(
        key,
        batch,
        method=method,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )
    return time_from_unit(u, schedule=schedule)


# ----------------------------------------------------------------------------------------------
# Weightings
# ----------------------------------------------------------------------------------------------


def snr(*, alpha_t, sigma_t):
    """alpha_t^2 / sigma_t^2 (inf where sigma_t = 0); the same in every space. Computed as
    (alpha / sigma)^2, as diffusers' `compute_snr`."""
    return (alpha_t / sigma_t) ** 2


def x0_error_scale_sq(prediction: str, *, snr):
    """k^2 with (x0 error) = k * (prediction error) at fixed z_t; see the module docstring."""
    if prediction == "x0":
        return jnp.ones_like(snr)
    if prediction == "eps":
        return 1.0 / snr
    if prediction == "v":
        return 1.0 / (1.0 + snr)
    if prediction == "flow":
        return 1.0 / (1.0 + jnp.sqrt(snr)) ** 2
    raise _unknown("prediction", prediction, param_lib.PREDICTIONS)


def min_snr_weight(*, snr, prediction: str, gamma=5.0):
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): x0 weight min(SNR, gamma), so min(SNR, gamma) / SNR for eps,
    min(SNR, gamma) / (SNR + 1) for v (as diffusers' train_text_to_image) and
    min(SNR, gamma) / (1 + sqrt(SNR))^2 for flow."""
    param_lib.check_prediction(prediction)
    if prediction == "eps":  # min(SNR, gamma) / SNR, written to stay finite at SNR = 0
        return jnp.minimum(1.0, gamma / snr)
    return jnp.minimum(snr, gamma) * x0_error_scale_sq(prediction, snr=snr)


def edm_weight(*, snr, prediction: str, sigma_data=0.5):
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al.
    2022, Table 1; the weight that makes eq. 8's effective weight lambda c_out^2 uniform) on
    the x0 loss, with sigma = sigma_t / alpha_t the variance-exploding sigma.

    With sigma^2 = 1 / SNR and c = 1 / sigma_data^2 the x0 weight is SNR + c; times k^2 (module
    docstring) it is 1 + c / SNR for eps, 1 + (c - 1) / (1 + SNR) for v (1 for all t when
    sigma_data = 1) and (1 - s)^2 + c s^2, s = 1 / (1 + sqrt(SNR)) = sigma_t, for flow. These
    forms stay finite at SNR = inf (sigma_t = 0).
    """
    c = 1.0 / sigma_data**2
    if prediction == "x0":
        return snr + c
    if prediction == "eps":
        return 1.0 + c / snr
    if prediction == "v":
        return 1.0 + (c - 1.0) / (1.0 + snr)
    if prediction == "flow":
        s = 1.0 / (1.0 + jnp.sqrt(snr))
        return (1.0 - s) ** 2 + c * s**2
    raise _unknown("prediction", prediction, param_lib.PREDICTIONS)


def flow_weight(weighting: str, *, snr):
    """SD 3's weightings of a flow prediction's loss, written on the rectified-flow time
    sigma = 1 / (1 + sqrt(SNR)) (diffusers' `compute_loss_weighting_for_sd3`): sigma_sqrt
    sigma^-2; cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)), the density of Esser et al. 2024's
    cosine-mapped times."""
    s = 1.0 / (1.0 + jnp.sqrt(snr))
    if weighting == "sigma_sqrt":
        return s**-2.0
    if weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    raise _unknown("flow weighting", weighting, FLOW_WEIGHTINGS)


def _check_flow_weighting(weighting: str, prediction: str) -> None:
    if weighting in FLOW_WEIGHTINGS and prediction != "flow":
        raise ValueError(
            f"weighting {weighting!r} is SD 3's, on a flow prediction; got {prediction!r}"
        )


def loss_weight(weighting: str, *, snr, prediction: str, min_snr_gamma=5.0, sigma_data=0.5):
    """Per-example weight [B] of the per-example mean loss of `prediction`:
    uniform | min_snr | edm | sigma_sqrt | cosmap (the last two: flow predictions only)."""
    param_lib.check_prediction(prediction)
    if weighting in FLOW_WEIGHTINGS:
        _check_flow_weighting(weighting, prediction)
        return flow_weight(weighting, snr=snr)
    if weighting == "uniform":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        return min_snr_weight(snr=snr, prediction=prediction, gamma=min_snr_gamma)
    if weighting == "edm":
        return edm_weight(snr=snr, prediction=prediction, sigma_data=sigma_data)
    raise _unknown("weighting", weighting, WEIGHTINGS)


# ----------------------------------------------------------------------------------------------
# Element losses
# ----------------------------------------------------------------------------------------------


def elementwise_loss(loss_type: str, *, pred, target, huber_c=0.001):
    """l2: d^2 | l1: |d| | huber: the pseudo-Huber sqrt(d^2 + c^2) - c of Song & Dhariwal 2023
    ("Improved Techniques for Training Consistency Models"), d = pred - target.

    The paper applies pseudo-Huber to the norm of the whole sample, with c = 0.00054 sqrt(dim);
    here it is per element with a fixed c, as diffusers' LCM distillation scripts (`huber_c`,
    default 0.001). It is written d^2 / (sqrt(d^2 + c^2) + c), which is exactly 0 at d = 0 and
    does not cancel in float32 for small d.
    """
    d = pred - target
    if loss_type == "l2":
        return d**2
    if loss_type == "l1":
        return jnp.abs(d)
    if loss_type == "huber":
        return d**2 / (jnp.sqrt(d**2 + huber_c**2) + huber_c)
    raise _unknown("loss type", loss_type, LOSS_TYPES)


def per_example_loss(loss_type: str, *, pred, target, huber_c=0.001):
    """The element loss averaged over every axis but the batch: [B, ...] -> [B]."""
    loss = elementwise_loss(loss_type, pred=pred, target=target, huber_c=huber_c)
    return jnp.mean(loss, axis=tuple(range(1, loss.ndim)))


# ----------------------------------------------------------------------------------------------
# The variational bound of a learned variance (Nichol & Dhariwal 2021)
# ----------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF (Page 1977), as improved-diffusion
    and DeepFloyd IF's training code use it (within 2e-4 of the exact CDF)."""
    return 0.5 * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, mean, log_scale):
    """log P(x) per element of 8-bit data x in [-1, 1] (bins of width 2 / 255, the edge bins
    open) under N(mean, e^(2 log_scale)): Ho et al. 2020's decoder L_0, in nats."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_term(*, schedule, prediction, output, var_values, x0, z_t, t):
    """The term of the variational bound at each example's timestep t, in bits per
    dimension [B] (Nichol & Dhariwal 2021, eq. 4-6 and 15): KL(q(z_{t-1} | z_t, x0) ||
    p(z_{t-1} | z_t)) for t > 0 and the discretized decoder's -log p(x0 | z_0) at t = 0.

    The model's mean is that of the posterior at the x0 its `output` predicts (unclipped), its
    log variance var_values' interpolation between log beta_t and log beta-tilde_t, the
    latter at t = 1 for t = 0 (improved-diffusion's `posterior_log_variance_clipped`, also
    the true posterior's). A DiscreteSchedule only (integer t of T steps, VP)."""
    if not isinstance(schedule, sched_lib.DiscreteSchedule):
        raise ValueError(
            f"the variational-bound term needs a discrete schedule (DDPM's T steps), got "
            f"{type(schedule).__name__}"
        )
    ex = lambda a: _per_example(a, x0)  # noqa: E731
    first = t == 0
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(jnp.maximum(t - 1, 0))
    alpha_s, sigma_s = jnp.where(first, 1.0, alpha_s), jnp.where(first, 0.0, sigma_s)
    coef_z, coef_x0, var_large, var_small = param_lib.posterior(
        alpha=alpha_t, sigma=sigma_t, alpha_next=alpha_s, sigma_next=sigma_s
    )
    a1, s1 = schedule.alpha_sigma(jnp.ones_like(t))
    a0, s0 = schedule.alpha_sigma(jnp.zeros_like(t))
    var_small_1 = param_lib.posterior(alpha=a1, sigma=s1, alpha_next=a0, sigma_next=s0)[3]
    min_log = jnp.log(jnp.where(first, var_small_1, var_small))
    frac = (var_values.astype(jnp.float32) + 1.0) / 2.0
    model_log_var = frac * ex(jnp.log(var_large)) + (1.0 - frac) * ex(min_log)
    x0_pred, _ = param_lib.to_x0_eps(
        prediction, output.astype(jnp.float32), z_t=z_t, alpha_t=ex(alpha_t), sigma_t=ex(sigma_t)
    )
    model_mean = ex(coef_z) * z_t + ex(coef_x0) * x0_pred
    true_mean = ex(coef_z) * z_t + ex(coef_x0) * x0
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(normal_kl(true_mean, ex(min_log), model_mean, model_log_var), axis=axes)
    nll = -jnp.mean(
        discretized_gaussian_log_likelihood(x0, mean=model_mean, log_scale=0.5 * model_log_var),
        axis=axes,
    )
    return jnp.where(first, nll, kl) / jnp.log(2.0)


# ----------------------------------------------------------------------------------------------
# The training loss
# ----------------------------------------------------------------------------------------------


def add_noise(*, x0, eps, alpha_t, sigma_t):
    """z_t = alpha_t x0 + sigma_t eps (Ho et al. 2020, eq. 4), alpha_t and sigma_t [B] per
    example."""
    return _per_example(alpha_t, x0) * x0 + _per_example(sigma_t, x0) * eps


def to_model_space(model_space: str, *, schedule, alpha_t, sigma_t):
    """(alpha_t, sigma_t) rescaled from the schedule's space into the network's (the same noise
    level: SNR is unchanged), e.g. a VP eps-network trained on a flow schedule's times."""
    if model_space == schedule_space(schedule):
        return alpha_t, sigma_t
    c = param_lib.network_scale(model_space, alpha=alpha_t, sigma=sigma_t)
    return c * alpha_t, c * sigma_t


def _check_options(*, prediction, model_space, time_sampling, weighting, loss_type, vlb_weight):
    param_lib.check_prediction(prediction)
    _check("model space", model_space, param_lib.MODEL_SPACES)
    _check("time sampling", time_sampling, TIME_SAMPLINGS)
    _check("weighting", weighting, WEIGHTINGS)
    _check("loss type", loss_type, LOSS_TYPES)
    _check_flow_weighting(weighting, prediction)
    needed = _PREDICTION_SPACE.get(prediction, model_space)
    if needed != model_space:
        raise ValueError(
            f"prediction {prediction!r} needs model_space {needed!r}, got {model_space!r}"
        )
    if vlb_weight < 0:
        raise ValueError(f"vlb_weight={vlb_weight}; expected >= 0")


def diffusion_loss(
    denoise_fn,
    x0,
    cond,
    key,
    *,
    schedule,
    prediction="eps",  # eps | x0 | v | flow
    model_space="vp",  # vp | flow
    time_sampling="uniform",  # uniform | stratified | logit_normal | mode
    logit_mean=0.0,
    logit_std=1.0,
    mode_scale=1.29,
    weighting="uniform",  # uniform | min_snr | edm | sigma_sqrt | cosmap
    min_snr_gamma=5.0,
    sigma_data=0.5,
    loss_type="l2",  # l2 | l1 | huber
    huber_c=0.001,
    learned_variance=False,
    vlb_weight=0.0,
    example_weight=None,
    x0_loss=False,
):
    """The weighted denoising loss of one batch: (scalar loss, aux).

    denoise_fn(z_t, t, cond) is the network: z_t [B, H, W, C], t [B] as `sample_time` gives
    it. `t` and eps come from `key_t, key_eps = jax.random.split(key)`: `sample_time(key_t, B,
    ...)` and `jax.random.normal(key_eps, x0.shape)`. z_t is built in `model_space` (a schedule
    from the other space is rescaled, `to_model_space`); prediction v needs vp and flow needs
    flow, and flow with a FlowSchedule is rectified-flow training (SD3).

    With `learned_variance` the network emits 2C channels and the first C are regressed; the
    variance channels are trained by `vlb_weight` times the variational-bound term of t
    (`vlb_term`, bits per dimension, the mean's gradient stopped): Nichol & Dhariwal 2021's
    L_hybrid with lambda = 0.001 is `vlb_weight = T / 1000` (1.0 for T = 1000: its code's
    RESCALED_MSE). aux then holds the per-example `vlb` too.

    With `x0_loss` the element loss is taken on the error of the x0 that the prediction
    implies at z_t, k * (prediction - target) (k from `x0_error_scale_sq`): for flow,
    sigma_t (pred - target), which is diffusers' SD 3 scripts' `precondition_outputs`
    (their x0 = z_t - sigma_t * pred regressed onto x0), also under l1 and huber.

    The loss is the batch mean of weight * per-example mean loss, in float32 (times
    `example_weight` [B] where given: e.g. DreamBooth's prior examples weighted against the
    instance ones); aux holds per example `t`, the unweighted `loss` and the `weight`, for
    logging.
    """
    _check_options(
        prediction=prediction,
        model_space=model_space,
        time_sampling=time_sampling,
        weighting=weighting,
        loss_type=loss_type,
        vlb_weight=vlb_weight,
    )
    x0 = jnp.asarray(x0, jnp.float32)
    key_t, key_eps = jax.random.split(key)
    t, alpha_t, sigma_t = sample_time(
        key_t,
        x0.shape[0],
        schedule=schedule,
        method=time_sampling,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    alpha_t, sigma_t = to_model_space(
        model_space, schedule=schedule, alpha_t=alpha_t, sigma_t=sigma_t
    )
    z_t = add_noise(x0=x0, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)  # [B, H, W, C]

    output = denoise_fn(z_t, t, cond)
    var_values = None
    if learned_variance:
        output, var_values = param_lib.split_variance(output, x0.shape[-1])  # [B, H, W, C]
    elif vlb_weight > 0:
        raise ValueError("vlb_weight > 0 trains a learned variance: set learned_variance")
    target = param_lib.target(
        prediction,
        x0=x0,
        eps=eps,
        alpha_t=_per_example(alpha_t, x0),
        sigma_t=_per_example(sigma_t, x0),
    )
    ratio = snr(alpha_t=alpha_t, sigma_t=sigma_t)
    pred = output.astype(jnp.float32)
    if x0_loss:  # the implied x0's error: both sides scaled by k per example
        k = _per_example(jnp.sqrt(x0_error_scale_sq(prediction, snr=ratio)), x0)
        pred, target = k * pred, k * target
    loss = per_example_loss(loss_type, pred=pred, target=target, huber_c=huber_c)  # [B]
    weight = loss_weight(
        weighting,
        snr=ratio,
        prediction=prediction,
        min_snr_gamma=min_snr_gamma,
        sigma_data=sigma_data,
    )
    aux = {"t": t, "loss": loss, "weight": weight}
    if example_weight is not None:
        weight = weight * jnp.asarray(example_weight, jnp.float32)
    total = jnp.mean(weight * loss)
    if vlb_weight > 0:  # the mean gets no gradient from it (L_hybrid's stop-gradient)
        vlb = vlb_term(
            schedule=schedule,
            prediction=prediction,
            output=jax.lax.stop_gradient(output),
            var_values=var_values,
            x0=x0,
            z_t=z_t,
            t=t,
        )
        total, aux["vlb"] = total + vlb_weight * jnp.mean(vlb), vlb
    return total, aux
