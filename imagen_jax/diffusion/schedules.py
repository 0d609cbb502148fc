"""Noise schedules: where a noised sample z_t = alpha_t * x0 + sigma_t * eps sits.

Three families, one vocabulary (`alpha`, `sigma`, `logsnr = log(alpha^2 / sigma^2)`):

* Discrete beta schedules of the public checkpoints (DDPM, Ho et al. 2020; Stable Diffusion;
  DeepFloyd IF): 1000 training timesteps, `alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)`.
  Built in float32 the way diffusers builds them, so that grids derived from them match.
* Continuous variance-preserving logSNR schedules over t in [0, 1] (Kingma et al. 2021,
  "Variational Diffusion Models"; Nichol & Dhariwal 2021 cosine; Hoogeboom et al. 2023,
  "simple diffusion", shifted cosine for high resolution).
* Rectified flow (Esser et al. 2024, SD3): z_t = (1 - t) * x0 + t * eps, with the
  resolution-dependent time shift of SD3 eq. 23.

Host-side helpers here return numpy arrays (they build static grids); the logSNR functions are
written with `jnp` so that the training loss can call them on traced times.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
LOGSNR_SCHEDULES = ("cosine", "shifted_cosine", "linear")


# ----------------------------------------------------------------------------------------------
# Discrete beta schedules (the public checkpoints)
# ----------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_steps: int, *, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 betas: Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.asarray(betas, np.float32)


def make_betas(
    name: str,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Betas [T] of a named discrete schedule: linear | scaled_linear | squaredcos_cap_v2."""
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    if name == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta).
        root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps).astype(np.float32)
        return root**2
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))  # float32, as diffusers
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static arg
class DiscreteSchedule:
    """A T-step variance-preserving schedule; the network is told the integer timestep t.

    `alphas_cumprod[t]` is alpha_t^2. Fractional timesteps (Karras grids) are placed by
    interpolating in log sigma, as k-diffusion and diffusers do.
    """

    alphas_cumprod: np.ndarray  # [T] float32

    @classmethod
    def from_config(
        cls,
        name: str = "linear",  # linear | scaled_linear | squaredcos_cap_v2
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        betas = make_betas(
            name,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        if zero_terminal_snr:  # keep sigma finite at t = T - 1, as diffusers does
            alphas_cumprod[-1] = 2.0**-24
        return cls(alphas_cumprod=alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def ve_sigmas(self) -> np.ndarray:
        """sigma / alpha for every training timestep [T] (the variance-exploding view)."""
        ac = self.alphas_cumprod  # float32 arithmetic, as the diffusers tables
        return np.sqrt((1.0 - ac) / ac)

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) for integer timesteps t (jnp, traceable)."""
        ac = jnp.asarray(self.alphas_cumprod)[t]
        return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)

    def ve_sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional timestep of a VE sigma, by linear interpolation in log sigma."""
        log_sigmas = np.log(self.ve_sigmas).astype(np.float64)
        log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
        dists = log_sigma[None, :] - log_sigmas[:, None]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)


# ----------------------------------------------------------------------------------------------
# Continuous logSNR schedules (variance preserving, t in [0, 1])
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogSNRSchedule:
    """A continuous VP schedule: logsnr(t) decreasing on t in [0, 1].

    name: cosine | shifted_cosine | linear
      cosine:          logsnr = -2 log tan(pi t / 2), clipped to [logsnr_min, logsnr_max]
                       (Nichol & Dhariwal 2021 without the offset; Kingma et al. 2023 form).
      shifted_cosine:  cosine + 2 log(base_resolution / resolution) (Hoogeboom et al. 2023,
                       "simple diffusion", sec. 3.1): more noise for larger images.
      linear:          logsnr = -log(expm1(1e-4 + 10 t^2)), imagen-pytorch's
                       `beta_linear_log_snr` (the continuous limit of the linear beta schedule).
    The network is told t (not logsnr).
    """

    name: str = "cosine"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    shift: float = 0.0  # 2 log(base_resolution / resolution) for shifted_cosine

    def __post_init__(self):
        if self.name not in LOGSNR_SCHEDULES:
            raise ValueError(
                f"unknown logSNR schedule {self.name!r}; expected one of {LOGSNR_SCHEDULES}"
            )

    @classmethod
    def shifted_cosine(cls, *, resolution: int, base_resolution: int = 64, **kw):
        return cls("shifted_cosine", shift=2.0 * math.log(base_resolution / resolution), **kw)

    def _t_bounds(self):
        # The cosine schedule is clipped by choosing the t range that maps to [min, max].
        t_min = math.atan(math.exp(-0.5 * self.logsnr_max)) * 2 / math.pi
        t_max = math.atan(math.exp(-0.5 * self.logsnr_min)) * 2 / math.pi
        return t_min, t_max

    def logsnr(self, t):
        t = jnp.asarray(t, jnp.float32)
        if self.name == "linear":
            return -jnp.log(jnp.expm1(1e-4 + 10.0 * t**2))
        t_min, t_max = self._t_bounds()
        t = t_min + t * (t_max - t_min)
        return -2.0 * jnp.log(jnp.tan(jnp.pi * t / 2)) + self.shift

    def t_from_logsnr(self, logsnr):
        """The inverse of `logsnr` (used to place Karras grids on a continuous schedule)."""
        logsnr = jnp.asarray(logsnr, jnp.float32)
        if self.name == "linear":
            return jnp.sqrt((jnp.log1p(jnp.exp(-logsnr)) - 1e-4) / 10.0)
        t_min, t_max = self._t_bounds()
        t = jnp.arctan(jnp.exp(-0.5 * (logsnr - self.shift))) * 2 / jnp.pi
        return (t - t_min) / (t_max - t_min)

    def alpha_sigma(self, t):
        return alpha_sigma_from_logsnr(self.logsnr(t))


def alpha_sigma_from_logsnr(logsnr):
    """VP (alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


# ----------------------------------------------------------------------------------------------
# Rectified flow
# ----------------------------------------------------------------------------------------------


def flow_time_shift(t, *, shift: float):
    """SD3 eq. 23: t' = shift * t / (1 + (shift - 1) * t); shift = sqrt(m / n) for m pixels
    against a base of n (SD3 uses shift 3.0 at 1024^2)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_dynamic_shift(
    image_seq_len: int, *, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15
) -> float:
    """mu of the resolution-dependent exponential shift (Flux / SD3.5): linear in sequence
    length; the shift applied is exp(mu)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """z_t = (1 - t) x0 + t eps; the network is told `t * num_train_timesteps` (SD3 convention)."""

    shift: float = 1.0
    num_train_timesteps: int = 1000

    def alpha_sigma(self, t):
        t = flow_time_shift(jnp.asarray(t, jnp.float32), shift=self.shift)
        return 1.0 - t, t


# ----------------------------------------------------------------------------------------------
# Karras et al. 2022 (EDM) sigmas
# ----------------------------------------------------------------------------------------------


def karras_sigmas(num_steps: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """EDM eq. 5: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho, i < N."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
