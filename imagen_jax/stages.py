"""A stage on disk: a denoising network's weights and everything needed to sample it.

A pixel stage (a base or super-resolution stage of a cascade):

    DIR/stage.json        {"unet": UNetConfig fields, "diffusion": the diffusion group,
                           "sample": the sample group, "resolution", "low_resolution",
                           "aug_level" (super-resolution: the sampling-time augmentation
                           level, a unit time), "text": the text group, "identity": where
                           the weights came from (workdir, step, ...), "domain": what
                           the stage was trained on ("shapes", or "" when unstated)}
    DIR/params.safetensors the (EMA) parameters, '/'-joined paths, float32 / bfloat16 /
                           float16

A latent stage (`family` "mmdit" or "sd_unet": a denoiser of the latents of a frozen VAE,
as configs/shapes_mmdit.py and configs/shapes_latent.py train it) adds to the same record
"family" and "network" (the SD3TransformerConfig or SDUNetConfig fields, and
null_text_len) in place of "unet", and "vae": the folder, relative to DIR, of the VAE that
decodes its latents, a diffusers AutoencoderKL directory (`models.vae.save_vae`; DIR/vae),
so that the directory is self-contained. A record without "family" is a pixel stage.

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
from imagen_jax.models import imagen_unet, latent_mmdit, latent_unet, sd3_transformer, sd_unet
from imagen_jax.models import vae as vae_lib
from imagen_jax.weights import CheckpointError

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
LATENT_FAMILIES = ("mmdit", "sd_unet")  # model.family of the stages that denoise VAE latents
VAE_DIR = "vae"  # a latent stage's VAE, under its directory


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


@dataclasses.dataclass
class LatentStage:
    """One loaded latent stage: the denoiser of a frozen VAE's latents (with its weights),
    the VAE that decodes them, and its sampling settings. The cascade samples it as a
    stage of its own kind (`pipelines.cascade`: `vae`, `channels`, `downsampling_factor`):
    latents of the image size / the VAE's factor, then decoded."""

    path: str
    family: str  # mmdit | sd_unet
    network_config: latent_mmdit.LatentMMDiTConfig | latent_unet.LatentUNetConfig
    model: latent_mmdit.LatentMMDiT | latent_unet.LatentUNet
    vae: vae_lib.AutoencoderKL
    diffusion: ml_collections.ConfigDict
    sample: ml_collections.ConfigDict
    resolution: int  # of the decoded images
    text: dict
    identity: dict
    domain: str = ""
    weights_sha256: str = ""  # of params.safetensors
    vae_sha256: str = ""  # of the VAE folder's weights
    low_resolution: int = 0  # a latent stage is a base stage
    aug_level: float = 0.0
    super_resolution: bool = False

    @property
    def channels(self) -> int:
        """Channels of what the sampler draws: the latents'."""
        return self.network_config.in_channels

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def downsampling_factor(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the network's own
        (the MMDiT's patch size, or the latent UNet's 2 ** (levels - 1))."""
        return self.vae_factor * 2 ** (self.network_config.num_levels - 1)

    @property
    def downsampling_note(self) -> str:
        net = "MMDiT's patch size" if self.family == "mmdit" else "UNet's downsampling factor"
        return (
            f"the VAE's factor {self.vae_factor} times the {net} "
            f"{self.downsampling_factor // self.vae_factor}"
        )

    def settings(self) -> dict:
        """What the metadata of an image records about this stage (as `Stage.settings`,
        with the VAE's weights' hash)."""
        return dict(
            path=self.path,
            family=self.family,
            resolution=self.resolution,
            sample=self.sample.to_dict(),
            diffusion=self.diffusion.to_dict(),
            weights_sha256=self.weights_sha256,
            vae_sha256=self.vae_sha256,
        )

    def with_settings(self, sample_overrides: dict | None = None, aug_level=None) -> LatentStage:
        """This stage with keys of its sample group replaced (the networks are shared)."""
        if aug_level is not None:
            _check_aug_level(self.path, 0, aug_level)
        sample = self.sample
        if sample_overrides:
            sample = diffusion_config.sample_config(**{**sample.to_dict(), **sample_overrides})
        return dataclasses.replace(self, sample=sample)


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
    _write_stage(path, params, meta, storage_dtype)


def _write_stage(path: str, params: dict, meta: dict, storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}")
    os.makedirs(path, exist_ok=True)
    flat = {
        k: np.asarray(v, np.float32).astype(STORAGE_DTYPES[storage_dtype])
        for k, v in flatten(params).items()
    }
    save_file(flat, os.path.join(path, "params.safetensors"))
    with open(os.path.join(path, "stage.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def network_fields(family: str, network) -> dict:
    """A latent network's config as stage.json records it: the SD3TransformerConfig
    ("mmdit") or SDUNetConfig ("sd_unet") fields, and null_text_len."""
    inner = network.transformer if family == "mmdit" else network.unet
    return dict(dataclasses.asdict(inner), null_text_len=network.null_text_len)


def _tuples(value):
    """JSON lists back to the tuples of a config dataclass (nested ones too)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def network_config(family: str, fields: dict):
    """The LatentMMDiTConfig / LatentUNetConfig of `network_fields`' record."""
    fields = {k: _tuples(v) for k, v in fields.items()}
    null_text_len = int(fields.pop("null_text_len"))
    if family == "mmdit":
        inner = sd3_transformer.SD3TransformerConfig(**fields)
        return latent_mmdit.LatentMMDiTConfig(inner, null_text_len=null_text_len)
    if family == "sd_unet":
        return latent_unet.LatentUNetConfig(sd_unet.SDUNetConfig(**fields), null_text_len)
    raise ValueError(f"family={family!r}: a latent stage is one of {LATENT_FAMILIES}")


def save_latent_stage(
    path: str,
    *,
    family: str,
    network,
    params: dict,
    vae: vae_lib.AutoencoderKL,
    diffusion,
    sample,
    resolution: int,
    text: dict | None = None,
    identity: dict | None = None,
    domain: str = "",
    storage_dtype: str = "float16",
) -> None:
    """Writes a latent stage directory (see the module docstring): the denoiser's `params`
    as a pixel stage's, and the VAE that decodes its latents as DIR/vae (float32, the
    diffusers layout that `latent.vae` and diffusers read)."""
    meta = dict(
        family=family,
        network=network_fields(family, network),
        vae=VAE_DIR,
        diffusion=diffusion.to_dict(),
        sample=sample.to_dict(),
        resolution=resolution,
        low_resolution=0,
        aug_level=0.0,
        text=text or {},
        identity=identity or {},
        domain=domain,
    )
    vae_params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
    vae_lib.save_vae(os.path.join(path, VAE_DIR), vae_params, vae.config)
    _write_stage(path, params, meta, storage_dtype)


def check_params(path: str, loaded: dict, expected: dict, what: str = "UNet") -> None:
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
            f"the weights in {path} do not fit its {what} config:\n  " + "\n  ".join(shown)
        )


def _model_with_params(build, weights_path: str, what: str = "UNet"):
    """The network `build()` makes, holding the parameters of `weights_path` (checked
    strictly against its shapes)."""

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
    check_params(weights_path, loaded, flatten(nnx.to_pure_dict(params)), what)
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


def _read_meta(path: str) -> tuple[dict, str]:
    """(stage.json's record, the weights file) of a stage directory, checked to be one."""
    meta_path, weights_path = (os.path.join(path, n) for n in ("stage.json", "params.safetensors"))
    for p in (meta_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} is not a stage directory: {p} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds no JSON object: not a stage record")
    family = meta.get("family", "imagen")
    if family != "imagen" and family not in LATENT_FAMILIES:
        raise CheckpointError(
            f"{meta_path}: family {family!r}; expected 'imagen' or one of {LATENT_FAMILIES}"
        )
    needed = {"diffusion", "sample", "resolution", "low_resolution"}
    needed |= {"network", "vae"} if family in LATENT_FAMILIES else {"unet"}
    missing = sorted(needed - set(meta))
    if missing:
        raise CheckpointError(f"{meta_path} lacks the keys {missing}: not a stage record")
    return meta, weights_path


def _sample_group(path: str, meta: dict, sample_overrides: dict | None):
    try:
        return diffusion_config.sample_config(**{**meta["sample"], **(sample_overrides or {})})
    except ValueError as e:  # a setting out of its range: name the stage too
        raise ValueError(f"{path}: {e}") from None


def load_stage(
    path: str,
    *,
    dtype=jnp.float32,
    sample_overrides: dict | None = None,
    aug_level: float | None = None,
) -> Stage | LatentStage:
    """Reads a stage directory, pixel (`Stage`) or latent (`LatentStage`, by its
    "family"); `sample_overrides` replace keys of its sample group, and `aug_level` (a
    super-resolution stage's) its stored augmentation level."""
    meta, weights_path = _read_meta(path)
    if meta.get("family", "imagen") in LATENT_FAMILIES:
        if aug_level is not None:
            _check_aug_level(path, 0, aug_level)
        return _load_latent_stage(path, meta, weights_path, dtype, sample_overrides)
    unet = imagen_unet.UNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["unet"].items()}
    )
    model = _model_with_params(
        lambda: imagen_unet.ImagenUNet(unet, rngs=nnx.Rngs(0), dtype=dtype), weights_path
    )
    sample = _sample_group(path, meta, sample_overrides)
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


def _load_latent_stage(path, meta, weights_path, dtype, sample_overrides) -> LatentStage:
    family = meta["family"]
    try:
        network = network_config(family, dict(meta["network"]))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}/stage.json: its network config is not one ({e})") from None
    vae_dir = os.path.join(path, meta["vae"])
    if not os.path.isdir(vae_dir):
        raise FileNotFoundError(
            f"{path} is a latent stage without its VAE: {vae_dir} (a diffusers AutoencoderKL "
            "folder) is missing; export or copy the stage again"
        )
    vae, vae_config = vae_lib.load_vae(vae_dir, dtype)
    if vae_config.latent_channels != network.in_channels:
        raise CheckpointError(
            f"{vae_dir} makes latents of {vae_config.latent_channels} channels; the stage's "
            f"network takes {network.in_channels}"
        )
    module = latent_mmdit.LatentMMDiT if family == "mmdit" else latent_unet.LatentUNet
    what = "MMDiT" if family == "mmdit" else "latent UNet"
    model = _model_with_params(
        lambda: module(network, rngs=nnx.Rngs(0), dtype=dtype), weights_path, what
    )
    return LatentStage(
        path=path,
        family=family,
        network_config=network,
        model=model,
        vae=vae,
        diffusion=diffusion_config.diffusion_config(**meta["diffusion"]),
        sample=_sample_group(path, meta, sample_overrides),
        resolution=int(meta["resolution"]),
        text=meta.get("text", {}),
        identity=meta.get("identity", {}),
        domain=meta.get("domain", ""),
        weights_sha256=files.file_sha256(weights_path),
        vae_sha256=files.folder_sha256(vae_dir),
    )
