"""Fréchet Inception Distance and Kernel Inception Distance from features, on the host.

* FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium", eq. 6): the Fréchet distance between the Gaussians N(mu_1, S_1)
  and N(mu_2, S_2) fitted to two feature sets,
      d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),
  in float64 with scipy's `sqrtm`, exactly as pytorch-fid's `calculate_frechet_distance`
  (1e-6 added to the diagonals when the product's root is not finite; a negligible
  imaginary part dropped). At D = 2048 one `sqrtm` takes from seconds to minutes of CPU.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 3): the unbiased MMD^2 with the
  polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; mean and
  standard deviation over subsets as torch-fidelity's `kid_features_to_metric` (its subset
  draws included: `np.random.RandomState(seed)`, rows of set 1 then of set 2 per subset).
* Statistics files: `.npz` with `mu` [D] and `sigma` [D, D], as pytorch-fid and clean-fid
  write them (they read only those two keys, so ours add `num_images` and `resize`).
  Feature files for KID: `.npz` with `feats` [N, D] (clean-fid's key; `features` is read
  too) or a `.npy` array.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from absl import logging

SQRTM_EPS = 1e-6  # pytorch-fid's diagonal offset for a singular product
IMAGINARY_ATOL = 1e-3  # pytorch-fid's limit on the imaginary part of the root's diagonal
KID_SUBSETS = 100  # torch-fidelity's and clean-fid's defaults
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's default rng_seed


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps=SQRTM_EPS
) -> float:
    """The Fréchet distance between N(mu1 [D], sigma1 [D, D]) and N(mu2, sigma2), float64."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not fit means of dim {d}")
    try:
        from scipy import linalg
    except ImportError:  # scipy is pinned in the "test" extra, not a core dependency
        raise ImportError("FID needs scipy (pip install scipy==1.17.1)") from None
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logging.warning("FID: singular product; adding %g to the covariances' diagonals", eps)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(
                f"FID: sqrtm has an imaginary part of {np.max(np.abs(covmean.imag)):.3g} "
                "(the covariances are far from positive semi-definite)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def check_features(features: np.ndarray, what: str = "features") -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{what}: expected a non-empty [N, D] array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{what}: non-finite values")
    return features


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] (unbiased, ddof=1) of features [N, D], in float64."""
    features = check_features(features).astype(np.float64)
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of x [m, D] and y [m, D] with k(a, b) = (a.b / D + 1)^3, float64:
    mean of k over distinct pairs within x and within y, minus twice the mean over x-y pairs.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"MMD needs two sets of equal size >= 2, got {x.shape} and {y.shape}")
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID (mean, std over subsets) of features1 [N1, D] and features2 [N2, D].

    Each of `num_subsets` subsets draws `subset_size` rows of each set without replacement
    (torch-fidelity's draws for the same seed); std is the population std (ddof=0).
    """
    f1, f2 = check_features(features1, "features1"), check_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}"
        )
    if subset_size > min(len(f1), len(f2)):
        raise ValueError(
            f"KID subset_size {subset_size} exceeds the smaller set ({len(f1)} and {len(f2)} "
            "feature rows): pass a smaller subset_size"
        )
    rng = np.random.RandomState(seed)
    mmds = np.zeros(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)]
        y = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds[i] = polynomial_mmd2(x, y)
    return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def save_stats(
    path: str | os.PathLike,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    num_images: int | None = None,
    resize: str | None = None,
) -> None:
    """Writes `mu` and `sigma` (and, if given, `num_images` and the resize convention) to a
    `.npz` that pytorch-fid and clean-fid read as well."""
    extra = {}
    if num_images is not None:
        extra["num_images"] = np.int64(num_images)
    if resize is not None:
        extra["resize"] = np.str_(resize)
    with open(path, "wb") as f:  # np.savez would append ".npz" to other names
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def _open_npz(path: str | os.PathLike, what: str) -> Mapping[str, np.ndarray]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:  # np.load's own message does not name the file
        raise ValueError(f"{what} file {path!r} is not a numpy .npz/.npy file ({e})") from None
    if isinstance(data, np.ndarray):  # a .npy file
        return {"": data}
    with data:
        return {k: data[k] for k in data.files}


def load_stats(path: str | os.PathLike) -> dict:
    """{"mu" [D], "sigma" [D, D] (float64), and "num_images", "resize" where recorded}."""
    data = _open_npz(path, "statistics")
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ValueError(
            f"statistics file {os.fspath(path)!r} lacks {missing} (it has {sorted(data)}); "
            "expected pytorch-fid / clean-fid's keys 'mu' and 'sigma'"
        )
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(
            f"statistics file {os.fspath(path)!r}: mu {mu.shape} and sigma {sigma.shape} "
            "are not [D] and [D, D]"
        )
    out = {"mu": mu, "sigma": sigma}
    if "num_images" in data:
        out["num_images"] = int(data["num_images"])
    if "resize" in data:
        out["resize"] = str(data["resize"])
    return out


def save_features(path: str | os.PathLike, features: np.ndarray) -> None:
    """Writes features [N, D] (float32) under clean-fid's key `feats`."""
    with open(path, "wb") as f:
        np.savez(f, feats=np.asarray(check_features(features), np.float32))


def load_features(path: str | os.PathLike) -> np.ndarray:
    """Features [N, D] from a `.npz` (key `feats` or `features`) or a `.npy` file."""
    data = _open_npz(path, "features")
    key = next((k for k in ("feats", "features", "") if k in data), None)
    if key is None:
        raise ValueError(
            f"features file {os.fspath(path)!r} has no 'feats' or 'features' (it has "
            f"{sorted(data)})"
        )
    return check_features(data[key], f"features file {os.fspath(path)!r}")
