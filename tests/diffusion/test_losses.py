"""Training losses: parity with diffusers' training utilities, closed forms, bad input.

diffusion_loss draws `key_t, key_eps = jax.random.split(key)` (its documented contract), so the
tests rebuild its eps and feed stand-in networks that know x0 and eps.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import training_utils

from imagen_jax.diffusion import losses, schedules, time_grids
from imagen_jax.diffusion import parameterization as param_lib

B, H, W, C = 8, 4, 4, 3
BETAS = {
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
}
SCHEDULES = {
    "discrete": schedules.DiscreteSchedule.from_config("scaled_linear", **BETAS["scaled_linear"]),
    "logsnr": schedules.LogSNRSchedule("cosine"),
    "flow": schedules.FlowSchedule(shift=3.0),
}


def make_x0(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, H, W, C)) * 0.5


def loss_eps(key, shape=(B, H, W, C)):
    """The eps that diffusion_loss draws from `key`."""
    _, key_eps = jax.random.split(key)
    return jax.random.normal(key_eps, shape, jnp.float32)


def ddpm_scheduler(beta_schedule, prediction_type="epsilon"):
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        **BETAS[beta_schedule],
    )


def our_discrete(beta_schedule):
    return schedules.DiscreteSchedule.from_config(beta_schedule, **BETAS[beta_schedule])


def diffusers_table(scheduler):
    return schedules.DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod.numpy())


def nhwc_to_torch(x):
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def torch_to_nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_snr_matches_diffusers_compute_snr(beta_schedule):
    scheduler = ddpm_scheduler(beta_schedule)
    t = np.arange(1000)
    expected = training_utils.compute_snr(scheduler, torch.from_numpy(t)).numpy()
    alpha_t, sigma_t = diffusers_table(scheduler).alpha_sigma(t)
    np.testing.assert_allclose(losses.snr(alpha_t=alpha_t, sigma_t=sigma_t), expected, rtol=1e-6)
    # Our own table differs from diffusers' by an ulp or so (np.linspace and np.cumprod against
    # their torch float32 versions), which SNR = ac / (1 - ac) amplifies where 1 - ac ~ 1e-4.
    alpha_t, sigma_t = our_discrete(beta_schedule).alpha_sigma(t)
    np.testing.assert_allclose(losses.snr(alpha_t=alpha_t, sigma_t=sigma_t), expected, rtol=2e-4)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_matches_diffusers_train_text_to_image(beta_schedule, prediction):
    gamma = 5.0
    scheduler = ddpm_scheduler(beta_schedule)
    timesteps = torch.arange(1000)
    snr = training_utils.compute_snr(scheduler, timesteps)
    # diffusers examples/text_to_image/train_text_to_image.py
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    mse_loss_weights = mse_loss_weights / (snr if prediction == "eps" else snr + 1)

    alpha_t, sigma_t = diffusers_table(scheduler).alpha_sigma(timesteps.numpy())
    ours = losses.loss_weight(
        "min_snr",
        snr=losses.snr(alpha_t=alpha_t, sigma_t=sigma_t),
        prediction=prediction,
        min_snr_gamma=gamma,
    )
    np.testing.assert_allclose(ours, mse_loss_weights.numpy(), rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_logit_normal_time_distribution(shift):
    """logit(u) ~ N(m, s^2) (SD3 sec. 3.1), and the SD3 shift adds log(shift) to the logit."""
    n, m, s = 100_000, 0.3, 1.2
    schedule = schedules.FlowSchedule(shift=shift, num_train_timesteps=1000)
    t, alpha_t, sigma_t = losses.sample_time(
        jax.random.key(1), n, schedule=schedule, method="logit_normal", logit_mean=m, logit_std=s
    )
    np.testing.assert_allclose(t, sigma_t * 1000)
    np.testing.assert_allclose(alpha_t, 1.0 - sigma_t)
    logit = scipy.special.logit(np.asarray(sigma_t, np.float64)) - np.log(shift)
    assert abs(logit.mean() - m) < 0.02
    assert abs(logit.std() - s) < 0.02

    # The same law as diffusers' sampler (a two-sample KS distance, well under its 0.1% level).
    u = training_utils.compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=m, logit_std=s, generator=torch.Generator().manual_seed(0)
    )
    expected = schedules.flow_time_shift(u.numpy().astype(np.float64), shift=shift)
    assert scipy.stats.ks_2samp(np.asarray(sigma_t), expected).statistic < 0.01


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_z_t_and_v_target_match_ddpm_scheduler(beta_schedule):
    scheduler = ddpm_scheduler(beta_schedule, "v_prediction")
    x0, key = make_x0(), jax.random.key(2)
    eps = loss_eps(key)
    seen = {}

    def network(z_t, t, cond):  # returns diffusers' velocity at the t it is given
        seen.update(z_t=np.asarray(z_t), t=np.asarray(t))
        t_torch = torch.from_numpy(np.asarray(t, np.int64))
        v = scheduler.get_velocity(nhwc_to_torch(x0), nhwc_to_torch(eps), t_torch)
        seen["z_t_diffusers"] = torch_to_nhwc(
            scheduler.add_noise(nhwc_to_torch(x0), nhwc_to_torch(eps), t_torch)
        )
        return jnp.asarray(torch_to_nhwc(v))

    _, aux = losses.diffusion_loss(
        network, x0, None, key, schedule=our_discrete(beta_schedule), prediction="v"
    )
    np.testing.assert_array_equal(aux["t"], seen["t"])
    assert seen["t"].dtype == np.int32 and seen["t"].min() >= 0 and seen["t"].max() < 1000
    np.testing.assert_allclose(seen["z_t"], seen["z_t_diffusers"], rtol=0, atol=1e-6)
    assert np.sqrt(np.max(aux["loss"])) < 1e-6  # RMS of (diffusers' v - our v target)


def test_flow_network_time_matches_flow_grid():
    """The network sees the shifted time times T during training, as during sampling."""
    shift, big_t, n = 3.0, 1000, 10
    grid = time_grids.flow_grid(n, shift=shift, num_train_timesteps=big_t)
    sigma_min = schedules.flow_time_shift(1.0 / big_t, shift=shift)
    u = np.linspace(1.0, sigma_min, n)  # the grid's levels before its shift
    schedule = schedules.FlowSchedule(shift=shift, num_train_timesteps=big_t)
    t, alpha_t, sigma_t = losses.time_from_unit(u, schedule=schedule)
    np.testing.assert_allclose(t, grid.t, rtol=1e-6)
    np.testing.assert_allclose(sigma_t, grid.sigma, rtol=1e-6)
    np.testing.assert_allclose(alpha_t, grid.alpha, rtol=1e-6, atol=1e-7)


def test_rectified_flow_training_is_sd3():
    """diffusers' train_dreambooth_sd3.py: noisy = (1 - sigma) x0 + sigma noise,
    target = noise - x0, sigma = timestep / T."""
    schedule = SCHEDULES["flow"]
    x0, key = make_x0(), jax.random.key(3)
    eps = loss_eps(key)
    seen = {}

    def network(z_t, t, cond):
        sigma = (t / schedule.num_train_timesteps)[:, None, None, None]
        seen.update(z_t=z_t, noisy=(1.0 - sigma) * x0 + sigma * eps)
        return eps - x0

    loss, _ = losses.diffusion_loss(
        network, x0, None, key, schedule=schedule, prediction="flow", model_space="flow"
    )
    np.testing.assert_allclose(seen["z_t"], seen["noisy"], atol=1e-6)
    assert float(loss) == 0.0


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def perfect_network(schedule, prediction, x0, eps, *, learned_variance=False):
    """Returns the exact target, knowing x0 and eps; alpha_t, sigma_t from the time it is told
    (needed by v only)."""

    def network(z_t, t, cond):
        alpha_t, sigma_t = (a.reshape(-1, 1, 1, 1) for a in schedule.alpha_sigma(t))
        out = param_lib.target(prediction, x0=x0, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)
        if learned_variance:
            out = jnp.concatenate([out, jnp.full_like(out, 7.0)], axis=-1)
        return out

    return network


PERFECT_CASES = [
    *[("discrete", p, "vp") for p in ("eps", "x0", "v")],
    *[("logsnr", p, "vp") for p in ("eps", "x0", "v")],
    *[("flow", p, "flow") for p in ("eps", "x0", "flow")],
]


@pytest.mark.parametrize("schedule_name,prediction,model_space", PERFECT_CASES)
def test_perfect_network_has_zero_loss(schedule_name, prediction, model_space):
    schedule = SCHEDULES[schedule_name]
    x0, key = make_x0(), jax.random.key(4)
    network = perfect_network(schedule, prediction, x0, loss_eps(key))
    loss, aux = losses.diffusion_loss(
        network,
        x0,
        None,
        key,
        schedule=schedule,
        prediction=prediction,
        model_space=model_space,
        weighting="min_snr",
    )
    assert abs(float(loss)) <= 1e-10
    np.testing.assert_array_less(np.abs(aux["loss"]), 1e-10)


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize(
    "weighting", [w for w in losses.WEIGHTINGS if w not in losses.FLOW_WEIGHTINGS]
)
def test_perfect_learned_variance_network_has_zero_loss(loss_type, weighting):
    schedule = SCHEDULES["logsnr"]
    x0, key = make_x0(), jax.random.key(5)
    network = perfect_network(schedule, "v", x0, loss_eps(key), learned_variance=True)
    loss, _ = losses.diffusion_loss(
        network,
        x0,
        None,
        key,
        schedule=schedule,
        prediction="v",
        weighting=weighting,
        loss_type=loss_type,
        learned_variance=True,
    )
    assert abs(float(loss)) <= 1e-10


def test_sd3_weightings_are_for_a_flow_prediction_only():
    for weighting in losses.FLOW_WEIGHTINGS:
        with pytest.raises(ValueError, match=f"weighting '{weighting}' is SD 3's"):
            losses.diffusion_loss(
                lambda z, t, c: z,
                make_x0(),
                None,
                jax.random.key(0),
                schedule=SCHEDULES["logsnr"],
                prediction="eps",
                weighting=weighting,
            )


def test_uniform_weight_is_one():
    snr = jnp.asarray([0.0, 1e-3, 1.0, 1e4, jnp.inf])
    for prediction in param_lib.PREDICTIONS:
        weight = losses.loss_weight("uniform", snr=snr, prediction=prediction)
        np.testing.assert_array_equal(weight, 1.0)


def test_min_snr_eps_weight_is_one_up_to_gamma():
    gamma = 5.0
    snr = jnp.asarray([0.0, 1e-4, 0.5, 4.999, 5.0])
    weight = losses.loss_weight("min_snr", snr=snr, prediction="eps", min_snr_gamma=gamma)
    np.testing.assert_array_equal(weight, 1.0)
    above = losses.loss_weight("min_snr", snr=jnp.asarray([10.0]), prediction="eps")
    np.testing.assert_allclose(above, 0.5)


def test_edm_x0_weight_is_karras_lambda():
    sigma_data = 0.5
    alpha_t, sigma_t = SCHEDULES["logsnr"].alpha_sigma(jnp.linspace(0.05, 0.95, 19))
    sigma = sigma_t / alpha_t  # the variance-exploding sigma
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    snr = losses.snr(alpha_t=alpha_t, sigma_t=sigma_t)
    weight = losses.loss_weight("edm", snr=snr, prediction="x0", sigma_data=sigma_data)
    np.testing.assert_allclose(weight, lam, rtol=1e-5)


CONVERSION_CASES = [("vp", p) for p in ("eps", "x0", "v")] + [
    ("flow", p) for p in ("eps", "x0", "flow")
]


@pytest.mark.parametrize("model_space,prediction", CONVERSION_CASES)
@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weight_converts_through_x0_error(model_space, prediction, weighting):
    """w_pred * |out - target|^2 = w_x0 * |x0_hat - x0|^2 for any network output."""
    schedule = SCHEDULES["logsnr"]
    x0 = make_x0()
    eps = jax.random.normal(jax.random.key(6), x0.shape)
    out = jax.random.normal(jax.random.key(7), x0.shape)
    alpha_t, sigma_t = schedule.alpha_sigma(jnp.linspace(0.05, 0.95, B))
    alpha_t, sigma_t = losses.to_model_space(
        model_space, schedule=schedule, alpha_t=alpha_t, sigma_t=sigma_t
    )
    alpha_b, sigma_b = alpha_t[:, None, None, None], sigma_t[:, None, None, None]
    z_t = losses.add_noise(x0=x0, eps=eps, alpha_t=alpha_t, sigma_t=sigma_t)
    target = param_lib.target(prediction, x0=x0, eps=eps, alpha_t=alpha_b, sigma_t=sigma_b)
    x0_hat, _ = param_lib.to_x0_eps(prediction, out, z_t=z_t, alpha_t=alpha_b, sigma_t=sigma_b)
    snr = losses.snr(alpha_t=alpha_t, sigma_t=sigma_t)
    weight = functools.partial(losses.loss_weight, weighting, snr=snr)
    lhs = weight(prediction=prediction) * losses.per_example_loss("l2", pred=out, target=target)
    rhs = weight(prediction="x0") * losses.per_example_loss("l2", pred=x0_hat, target=x0)
    np.testing.assert_allclose(lhs, rhs, rtol=2e-4)


def test_weights_finite_at_the_ends():
    snr = jnp.asarray([0.0, jnp.inf])
    for prediction in param_lib.PREDICTIONS:
        assert np.all(np.isfinite(losses.loss_weight("min_snr", snr=snr, prediction=prediction)))
        edm = losses.loss_weight("edm", snr=snr, prediction=prediction)
        finite_at = {"eps": [1], "x0": [0]}.get(prediction, [0, 1])  # the others are true infs
        assert np.all(np.isfinite(np.asarray(edm)[finite_at]))


def test_loss_types_on_a_known_difference():
    d = np.asarray([0.0, 1e-3, -0.5, 3.0], np.float32)
    pred = jnp.asarray(np.stack([d, 2 * d]).reshape(2, 2, 2, 1))
    target = jnp.zeros_like(pred)
    c = 0.001
    expected = {
        "l2": lambda x: x**2,
        "l1": np.abs,
        "huber": lambda x: np.sqrt(x.astype(np.float64) ** 2 + c**2) - c,
    }
    for loss_type, f in expected.items():
        got = losses.per_example_loss(loss_type, pred=pred, target=target, huber_c=c)
        np.testing.assert_allclose(got, [f(d).mean(), f(2 * d).mean()], rtol=1e-6)


def test_stratified_times_fill_every_bin():
    t, _, _ = losses.sample_time(
        jax.random.key(8), 64, schedule=SCHEDULES["logsnr"], method="stratified"
    )
    bins = np.sort(np.floor(np.asarray(t) * 64).astype(int))
    np.testing.assert_array_equal(bins, np.arange(64))


def test_discrete_times_are_uniform_integers():
    t, alpha_t, sigma_t = losses.sample_time(
        jax.random.key(9), 100_000, schedule=SCHEDULES["discrete"]
    )
    t = np.asarray(t)
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 3.0  # std of the mean: 289 / sqrt(1e5) = 0.9
    np.testing.assert_allclose(alpha_t**2 + sigma_t**2, 1.0, rtol=1e-6)


def linear_network(params):
    def network(z_t, t, cond):  # z_t [B, H, W, C], t [B]
        time = jnp.cos(t.astype(jnp.float32) / 1000.0)[:, None, None, None]
        return jnp.einsum("bhwc,cd->bhwd", z_t, params["w"]) + time * params["b"]

    return network


def init_params():
    w = jnp.eye(C) + 0.1 * jax.random.normal(jax.random.key(10), (C, C))
    return {"w": w, "b": jnp.full((C,), 0.1)}


LOSS_CONFIGS = {
    "eps_discrete_min_snr": dict(schedule=SCHEDULES["discrete"], weighting="min_snr"),
    "flow_logit_normal_huber": dict(
        schedule=SCHEDULES["flow"],
        prediction="flow",
        model_space="flow",
        time_sampling="logit_normal",
        loss_type="huber",
    ),
}


@pytest.mark.parametrize("config", sorted(LOSS_CONFIGS))
def test_jit_and_gradient_of_a_linear_model(config):
    def loss_fn(params, x0, key):
        return losses.diffusion_loss(linear_network(params), x0, None, key, **LOSS_CONFIGS[config])

    params, x0, key = init_params(), make_x0(), jax.random.key(11)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, x0, key)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert aux["t"].shape == aux["loss"].shape == aux["weight"].shape == (B,)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_sharded_batch_matches_single_device():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params, x0, key = init_params(), make_x0(), jax.random.key(12)
    loss_fn = jax.jit(
        lambda params, x0, key: losses.diffusion_loss(
            linear_network(params), x0, None, key, **LOSS_CONFIGS["eps_discrete_min_snr"]
        )
    )
    loss, aux = loss_fn(params, x0, key)
    sharded_loss, sharded_aux = loss_fn(params, jax.device_put(x0, sharding), key)
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
    np.testing.assert_array_equal(sharded_aux["t"], aux["t"])


# ----------------------------------------------------------------------------------------------
# The variational bound of a learned variance
# ----------------------------------------------------------------------------------------------


def _vlb_case(beta_schedule, seed=0):
    """8-bit x0, its z_t at timesteps that include 0 and 1, a network's eps near the true one
    and variance values in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x0 = (rng.integers(0, 256, size=(B, H, W, C)) / 127.5 - 1.0).astype(np.float32)
    eps = rng.standard_normal((B, H, W, C)).astype(np.float32)
    t = np.array([0, 1, 2, 10, 100, 500, 900, 999], np.int32)
    schedule = schedules.DiscreteSchedule.from_config(beta_schedule, **BETAS.get(beta_schedule, {}))
    alpha, sigma = (np.asarray(a)[:, None, None, None] for a in schedule.alpha_sigma(t))
    z_t = alpha * x0 + sigma * eps
    eps_pred = eps + 0.01 * rng.standard_normal(eps.shape).astype(np.float32)
    var_values = rng.uniform(-1, 1, size=eps.shape).astype(np.float32)
    return schedule, x0, z_t, t, eps_pred, var_values


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_vlb_term_matches_diffusers_posterior_and_torch_distributions(beta_schedule):
    """KL(q || p) at t > 0 from diffusers' DDPMScheduler's posterior coefficients and its
    learned_range variance (`_get_variance`), by torch.distributions; at t = 0 the exact
    8-bit bin probability under the model's Gaussian (our CDF is the tanh approximation)."""
    schedule, x0, z_t, t, eps_pred, var_values = _vlb_case(beta_schedule)
    ours = np.asarray(
        losses.vlb_term(
            schedule=schedule,
            prediction="eps",
            output=jnp.asarray(eps_pred),
            var_values=jnp.asarray(var_values),
            x0=jnp.asarray(x0),
            z_t=jnp.asarray(z_t),
            t=jnp.asarray(t),
        )
    )
    ref = diffusers.DDPMScheduler(
        beta_schedule=beta_schedule, variance_type="learned_range", **BETAS.get(beta_schedule, {})
    )
    normal = torch.distributions.Normal
    to_t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    for i, step in enumerate(t):
        ac = ref.alphas_cumprod.double()
        a_t, beta = ac[step], ref.betas.double()[step]
        a_prev = ac[step - 1] if step > 0 else torch.tensor(1.0, dtype=torch.float64)
        x0_pred = (to_t(z_t[i]) - (1 - a_t) ** 0.5 * to_t(eps_pred[i])) / a_t**0.5
        c_x0 = a_prev**0.5 * beta / (1 - a_t)
        c_z = (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
        model_mean = c_x0 * x0_pred + c_z * to_t(z_t[i])
        if step == 0:  # the decoder: exact bins of width 2 / 255, the edge bins open
            dist = normal(model_mean, torch.exp(0.5 * _ref_log_var(ref, 1, var_values[i], 0)))
            x = to_t(x0[i])
            upper = torch.where(x > 0.999, torch.ones_like(x), dist.cdf(x + 1 / 255))
            lower = torch.where(x < -0.999, torch.zeros_like(x), dist.cdf(x - 1 / 255))
            want = -torch.log(upper - lower).mean() / np.log(2)
            assert abs(ours[i] - float(want)) < 2e-2 * max(1.0, float(want)), (ours[i], want)
            continue
        true_mean = c_x0 * to_t(x0[i]) + c_z * to_t(z_t[i])
        fixed = ref._get_variance(int(step), variance_type="fixed_small").double()
        true_std = torch.exp(0.5 * torch.log(fixed))
        model_std = torch.exp(0.5 * _ref_log_var(ref, step, var_values[i]))
        kl = torch.distributions.kl_divergence(
            normal(true_mean, true_std), normal(model_mean, model_std)
        )
        want = float(kl.mean() / np.log(2))
        assert abs(ours[i] - want) < 1e-4 * max(1.0, want), (step, ours[i], want)


def _ref_log_var(ref, step, var_values, at=None):
    """diffusers' learned_range log variance at `step` (its min from beta-tilde at `step`,
    the max log beta at `at`, default `step`)."""
    v = torch.from_numpy(np.asarray(var_values, np.float64))
    log_var = ref._get_variance(int(step), predicted_variance=v, variance_type="learned_range")
    if at is None:
        return log_var.double()
    frac = (v + 1) / 2  # the same mix with log beta of `at` (improved-diffusion at t = 0)
    min_log = torch.log(ref._get_variance(int(step), variance_type="fixed_small").double())
    return frac * torch.log(ref.betas.double()[at]) + (1 - frac) * min_log


def test_vlb_trains_the_variance_alone():
    """With vlb_weight the variance channels get a gradient and the prediction's gradient is
    the plain loss's (the variational term sees the prediction through a stop-gradient)."""
    schedule = schedules.DiscreteSchedule.from_config("linear", **BETAS["linear"])
    x0 = make_x0()

    def loss(params, vlb_weight):
        def network(z_t, t, cond):
            var = jnp.full_like(z_t, jnp.tanh(params["var"]))
            return jnp.concatenate([params["pred"] * z_t, var], -1)

        kw = dict(schedule=schedule, learned_variance=True, vlb_weight=vlb_weight)
        return losses.diffusion_loss(network, x0, None, jax.random.key(3), **kw)[0]

    params = {"pred": jnp.float32(0.3), "var": jnp.float32(0.5)}
    with_vlb = jax.grad(loss)(params, 1.0)
    without = jax.grad(loss)(params, 0.0)
    np.testing.assert_allclose(with_vlb["pred"], without["pred"], rtol=1e-6)
    # (small: beta and beta-tilde differ little but at small t)
    assert float(without["var"]) == 0.0 and abs(float(with_vlb["var"])) > 1e-7


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def call_loss(**overrides):
    kw = dict(schedule=SCHEDULES["discrete"]) | overrides
    network = lambda z_t, t, cond: z_t  # noqa: E731
    return losses.diffusion_loss(network, make_x0(), None, jax.random.key(0), **kw)


@pytest.mark.parametrize("option", ["weighting", "time_sampling", "loss_type", "prediction"])
def test_unknown_option_raises_naming_it(option):
    with pytest.raises(ValueError, match="'bogus'"):
        call_loss(**{option: "bogus"})


def test_unknown_names_raise_in_the_building_blocks():
    snr = jnp.ones((2,))
    with pytest.raises(ValueError, match="'bogus'"):
        losses.loss_weight("bogus", snr=snr, prediction="eps")
    with pytest.raises(ValueError, match="'bogus'"):
        losses.per_example_loss("bogus", pred=snr, target=snr)
    with pytest.raises(ValueError, match="'bogus'"):
        losses.sample_time(jax.random.key(0), 2, schedule=SCHEDULES["flow"], method="bogus")
    with pytest.raises(ValueError, match="'dict'"):
        losses.sample_time(jax.random.key(0), 2, schedule={})


def test_prediction_outside_its_space_raises():
    with pytest.raises(ValueError, match="'v' needs model_space 'vp'"):
        call_loss(prediction="v", model_space="flow")
    with pytest.raises(ValueError, match="'flow' needs model_space 'flow'"):
        call_loss(prediction="flow")


def test_vlb_term_needs_a_learned_variance_and_a_discrete_schedule():
    with pytest.raises(ValueError, match="set learned_variance"):
        call_loss(vlb_weight=1.0)
    with pytest.raises(ValueError, match="needs a discrete schedule"):
        losses.diffusion_loss(
            lambda z_t, t, cond: jnp.concatenate([z_t, z_t], axis=-1),
            make_x0(),
            None,
            jax.random.key(0),
            schedule=SCHEDULES["logsnr"],
            learned_variance=True,
            vlb_weight=1.0,
        )


def test_learned_variance_needs_twice_the_channels():
    with pytest.raises(ValueError, match="6 output channels"):
        call_loss(learned_variance=True)
