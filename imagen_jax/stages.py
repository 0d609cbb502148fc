"""A cascade stage on disk: the UNet's weights and everything needed to sample it.

    DIR/stage.json        {"unet": UNetConfig fields, "diffusion": the diffusion group,
                           "sample": the sample group, "resolution", "low_resolution",
                           "aug_level" (super-resolution: the sampling-time augmentation
                           level, a unit time), "text": the text group, "identity": where
                           the weights came from (workdir, step, ...), "domain": what
                           the stage was trained on ("shapes", or "" when unstated)}
    DIR/params.safetensors the (EMA) parameters, '/'-joined paths, float32 / bfloat16 /
                           float16

Weights are data: loading reads safetensors only, and is strict (every missing,
unexpected or mis-shaped parameter is named).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from imagen_jax import files
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.models import imagen_unet
from imagen_jax.weights import CheckpointError

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree


@dataclasses.dataclass
class Stage:
    """One loaded stage: the network (with its weights) and its sampling settings."""

    path: str
    unet: imagen_unet.UNetConfig
    model: imagen_unet.ImagenUNet
    diffusion: ml_collections.ConfigDict
    sample: ml_collections.ConfigDict
    resolution: int
    low_resolution: int
    aug_level: float
    text: dict
    identity: dict
    domain: str = ""
    weights_sha256: str = ""  # of params.safetensors: what identifies the weights

    def settings(self) -> dict:
        """What the metadata of an image records about this stage: its settings and the
        SHA-256 of its weights (the identity in stage.json, with the training workdir it
        came from, stays there)."""
        return dict(
            path=self.path,
            resolution=self.resolution,
            aug_level=self.aug_level,
            sample=self.sample.to_dict(),
            diffusion=self.diffusion.to_dict(),
            weights_sha256=self.weights_sha256,
        )

    def with_settings(self, sample_overrides: dict | None = None, aug_level=None) -> Stage:
        """This stage with keys of its sample group replaced (and a super-resolution
        stage's augmentation level), as `load_stage` would read it with those overrides;
        the network is shared, not copied."""
        sample = self.sample
        if sample_overrides:
            sample = diffusion_config.sample_config(**{**sample.to_dict(), **sample_overrides})
        if sample.layout_scale != self.sample.layout_scale:
            raise ValueError(
                f"{self.path}: layout_scale is a setting of the loaded network; load the "
                "stage again to change it"
            )
        if aug_level is None:
            aug_level = self.aug_level
        else:
            _check_aug_level(self.path, self.low_resolution, aug_level)
        return dataclasses.replace(self, sample=sample, aug_level=float(aug_level))


def save_stage(
    path: str,
    *,
    unet: imagen_unet.UNetConfig,
    params: dict,
    diffusion,
    sample,
    resolution: int,
    low_resolution: int = 0,
    aug_level: float = 0.0,
    text: dict | None = None,
    identity: dict | None = None,
    domain: str = "",
    storage_dtype: str = "float16",
) -> None:
    """Writes a stage directory (see the module docstring)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}")
    os.makedirs(path, exist_ok=True)
    flat = {
        k: np.asarray(v, np.float32).astype(STORAGE_DTYPES[storage_dtype])
        for k, v in flatten(params).items()
    }
    save_file(flat, os.path.join(path, "params.safetensors"))
    meta = dict(
        unet=dataclasses.asdict(unet),
        diffusion=diffusion.to_dict(),
        sample=sample.to_dict(),
        resolution=resolution,
        low_resolution=low_resolution,
        aug_level=aug_level,
        text=text or {},
        identity=identity or {},
        domain=domain,
    )
    with open(os.path.join(path, "stage.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def check_params(path: str, loaded: dict, expected: dict) -> None:
    problems = []
    for key in sorted(set(expected) - set(loaded)):
        problems.append(f"missing {key} {tuple(expected[key].shape)}")
    for key in sorted(set(loaded) - set(expected)):
        problems.append(f"unexpected {key} {tuple(loaded[key].shape)}")
    for key in sorted(set(loaded) & set(expected)):
        if tuple(loaded[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: file {tuple(loaded[key].shape)}, config {tuple(expected[key].shape)}"
            )
    if problems:
        shown = problems[:20]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise ValueError(
            f"the weights in {path} do not fit its UNet config:\n  " + "\n  ".join(shown)
        )


def _model_with_params(unet: imagen_unet.UNetConfig, weights_path: str, dtype):
    """The UNet of `unet` holding the parameters of `weights_path` (checked strictly)."""

    def build():
        return imagen_unet.ImagenUNet(unet, rngs=nnx.Rngs(0), dtype=dtype)

    # Only the shapes of an initialisation are needed: the parameters come from the file,
    # and the other variables (dropout RNG state) from a program whose parameter
    # initialisers XLA drops (compiling those takes tens of seconds on a CPU even for a
    # tiny UNet).
    graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    try:
        loaded = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file ({e}): the stage's weights "
            "are corrupt or partly copied; export or copy the stage again"
        ) from None
    check_params(weights_path, loaded, flatten(nnx.to_pure_dict(params)))
    nnx.replace_by_pure_dict(
        params, unflatten({k: jnp.asarray(v, jnp.float32) for k, v in loaded.items()})
    )
    return nnx.merge(graphdef, params, rest)


def read_stage_resolution(path: str) -> int:
    """The resolution a stage directory samples at, from its stage.json alone."""
    with open(os.path.join(path, "stage.json"), encoding="utf-8") as f:
        return int(json.load(f)["resolution"])


def _check_aug_level(path: str, low_resolution: int, aug_level: float) -> None:
    if not low_resolution:
        raise ValueError(f"aug_level={aug_level}: {path} is a base stage (no low-res input)")
    if not 0.0 <= aug_level <= 1.0:
        raise ValueError(f"aug_level={aug_level}: expected a unit time in [0, 1]")


def load_stage(
    path: str,
    *,
    dtype=jnp.float32,
    sample_overrides: dict | None = None,
    aug_level: float | None = None,
) -> Stage:
    """Reads a stage directory; `sample_overrides` replace keys of its sample group, and
    `aug_level` (a super-resolution stage's) its stored augmentation level."""
    meta_path, weights_path = (os.path.join(path, n) for n in ("stage.json", "params.safetensors"))
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} is not a stage directory: {p} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e})") from None
    missing = sorted({"unet", "diffusion", "sample", "resolution", "low_resolution"} - set(meta))
    if missing:
        raise CheckpointError(f"{meta_path} lacks the keys {missing}: not a stage record")
    unet = imagen_unet.UNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["unet"].items()}
    )
    model = _model_with_params(unet, weights_path, dtype)
    try:
        sample = diffusion_config.sample_config(**{**meta["sample"], **(sample_overrides or {})})
    except ValueError as e:  # a setting out of its range: name the stage too
        raise ValueError(f"{path}: {e}") from None
    if unet.layout_grid:
        model.layout_scale = float(sample.layout_scale)
    if aug_level is not None:
        _check_aug_level(path, meta["low_resolution"], aug_level)
    return Stage(
        path=path,
        unet=unet,
        model=model,
        diffusion=diffusion_config.diffusion_config(**meta["diffusion"]),
        sample=sample,
        resolution=int(meta["resolution"]),
        low_resolution=int(meta["low_resolution"]),
        aug_level=float(meta["aug_level"] if aug_level is None else aug_level),
        text=meta["text"],
        identity=meta["identity"],
        domain=meta.get("domain", ""),
        weights_sha256=files.file_sha256(weights_path),
    )
