"""Stable Diffusion 1.x / 2.x and SDXL (base and refiner) from a diffusers directory:
text-to-image, image-to-image, inpainting, and the SDXL base -> refiner handoff.

    pipe = load_sd_pipeline("models/stable-diffusion-v1-5")
    out = pipe(["a photo of an astronaut riding a horse"], seed=0, steps=30)
    out.images  # float32 [B, H, W, 3] in [0, 1]

    # SDXL: the base denoises the first 80% of the steps, the refiner the rest
    base, refiner = load_sd_pipeline(sdxl_dir), load_sd_pipeline(refiner_dir)
    latents = base(prompts, seed=0, steps=40, denoising_end=0.8, output="latent").latents
    out = refiner(prompts, image_latents=latents, steps=40, denoising_start=0.8, seed=0)

The numerics are diffusers' pipelines': the scheduler config maps onto our sampler and grid
(`diffusers_format.scheduler_settings`); the text goes through CLIP as diffusers encodes it
(SD: the last hidden state of 77 tokens; SDXL: the penultimate layer of both encoders,
concatenated, and the second's projected pooled output, with size / crop (base) or
aesthetic-score (refiner) time ids); classifier-free guidance is batched into one network
call; the latents are decoded by the VAE after undoing its scaling. The whole denoising
loop is one compiled program per (shape, steps).

Inpainting (`mask`, 1 = repaint, with `image`) takes diffusers' inpainting UNets (SD 1.x / 2.x
and SDXL inpainting checkpoints: 9 input channels, the latents then the mask and the masked
image's latents, as `StableDiffusionInpaintPipeline` and `StableDiffusionXLInpaintPipeline`
feed them): the mask is binarized at 0.5, the masked image is the image with the masked
region set to 0 (mid-grey) in [-1, 1], encoded by the VAE, and the mask is taken at latent
resolution by nearest-neighbour subsampling; strength 1 (the default) starts from pure
noise. A text-to-image UNet (4 channels) given a mask runs the samplers' masked sampling
(`diffusion.samplers.editable`): the kept region is put back after every step at the
level reached, noised by a fresh draw each step (diffusers' legacy inpainting of 4-channel
UNets reuses the initial noise instead, so the two differ there).

Images and latents are channels-last (NHWC). Image (row r) of a call with `seed` gets the
noise of fold_in(key(seed), r); `noise` gives the initial noise explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax import files
from imagen_jax import images as images_lib
from imagen_jax.diffusion import config as diffusion_config
from imagen_jax.diffusion import samplers
from imagen_jax.models import lora as lora_lib
from imagen_jax.models import sd_unet, vae
from imagen_jax.pipelines import diffusers_format, jobs
from imagen_jax.text.encoder import TextEncoder, load_text_encoder
from imagen_jax.text.joint import JointTextEncoder
from imagen_jax.weights import CheckpointError


@dataclasses.dataclass
class LatentOutput:
    images: np.ndarray | None  # float32 [B, H, W, 3] in [0, 1] (None for output="latent")
    latents: jax.Array  # [B, h, w, C]: the sampler's final state (scaled latents)


@dataclasses.dataclass
class LatentPipeline:
    """A loaded SD / SDXL pipeline; call it to sample (see the module docstring)."""

    path: str
    family: str  # stable_diffusion | stable_diffusion_xl
    unet: sd_unet.SDUNet
    unet_config: sd_unet.SDUNetConfig
    vae: vae.AutoencoderKL
    encoders: list[TextEncoder]  # SD: [text_encoder]; SDXL: [text_encoder, text_encoder_2]
    diffusion: ml_collections.ConfigDict
    sample: ml_collections.ConfigDict  # defaults of every call (the scheduler's settings)
    requires_aesthetics_score: bool = False  # the SDXL refiner's time ids
    force_zeros_for_empty_prompt: bool = True  # SDXL: no negative prompt = zero embeddings
    lora: str = ""  # a diffusers LoRA file merged into the UNet ("" = none)

    def __post_init__(self):
        self.unet.eval()
        self._unet_graph, self._unet_state = nnx.split(self.unet)
        self._vae_graph, self._vae_state = nnx.split(self.vae)
        self._samplers: dict = {}
        # on_step(step_index): progress from inside the compiled loop, for samplers
        # compiled while it is set (None: none compiled in).
        self.on_step = None
        self.mesh = None  # `set_mesh`: the devices a batch is split over (None: one device)

    def set_mesh(self, mesh) -> None:
        """Split every batch whose size the mesh's first axis divides over its devices (the
        weights replicated on each; None: one device). Row r's image depends on its key
        only, so the images are those of one device."""
        self.mesh = mesh
        where = jax.devices()[0] if mesh is None else NamedSharding(mesh, PartitionSpec())
        self._unet_state = jax.device_put(self._unet_state, where)
        self._vae_state = jax.device_put(self._vae_state, where)

    def _place(self, tree, batch: int):
        """The call's inputs with their rows split over the mesh; a batch the mesh does not
        divide runs whole on every device (replicated)."""
        if self.mesh is None:
            return tree
        split = batch % self.mesh.devices.shape[0] == 0
        rows = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0] if split else None))
        return jax.device_put(tree, rows)

    @property
    def xl(self) -> bool:
        return self.family == "stable_diffusion_xl"

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: latents, mask and masked-image latents in (2 C + 1 channels)."""
        return self.unet_config.in_channels != self.latent_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- text ----------------------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str]):
        """(tokens [B, L, D], pooled [B, P] or None) as the pipeline conditions on them."""
        if not self.xl:
            out = self.encoders[0].encode(prompts)
            return out.embeddings, None
        out = JointTextEncoder(self.encoders).encode(prompts)  # the refiner: encoder 2 alone
        return out.embeddings, out.pooled

    def _encode_pairs(self, prompts: Sequence[str], negative_prompts=None):
        """((tokens, pooled) of the prompts, those of their negatives ("" by default)),
        encoded in one call: a row's encoding does not depend on the rows beside it, and
        the encoders' compiled batch (`PROMPT_BUCKET`) holds a prompt and its negative."""
        b = len(prompts)
        negatives = [""] * b if negative_prompts is None else list(negative_prompts)
        if len(negatives) != b:
            raise ValueError(f"{len(negatives)} negative prompts for {b} prompts")
        tokens, pooled = self._encode(list(prompts) + negatives)
        if pooled is None:
            return (tokens[:b], None), (tokens[b:], None)
        return (tokens[:b], pooled[:b]), (tokens[b:], pooled[b:])

    def _time_ids(self, height, width, aesthetic_score):
        if self.requires_aesthetics_score:
            return [height, width, 0, 0, aesthetic_score]
        return [height, width, 0, 0, height, width]

    def conditioning(
        self,
        prompts,
        negative_prompts=None,
        *,
        height,
        width,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
    ):
        """(cond, uncond) trees of the network's conditioning for a batch of prompts."""
        b = len(prompts)
        if negative_prompts is None and self.xl and self.force_zeros_for_empty_prompt:
            tokens, pooled = self._encode(prompts)
            neg_tokens = jnp.zeros_like(tokens)
            neg_pooled = jnp.zeros_like(pooled)
        else:
            (tokens, pooled), (neg_tokens, neg_pooled) = self._encode_pairs(
                prompts, negative_prompts
            )
        cond, uncond = {"text": tokens}, {"text": neg_tokens}
        if self.xl:
            ids = self._time_ids(height, width, aesthetic_score)
            neg_ids = self._time_ids(height, width, negative_aesthetic_score)
            cond["added"] = dict(
                text_embeds=pooled, time_ids=jnp.tile(jnp.asarray([ids], jnp.float32), (b, 1))
            )
            uncond["added"] = dict(
                text_embeds=neg_pooled,
                time_ids=jnp.tile(jnp.asarray([neg_ids], jnp.float32), (b, 1)),
            )
        return cond, uncond

    # -- sampling ------------------------------------------------------------------------------

    def _sampler(self, sampling: diffusion_config.Sampling):
        key = (
            self.on_step is not None,
            sampling.sampler,
            tuple(sorted(sampling.sampler_options.items())),
            tuple(sorted((k, str(v)) for k, v in sampling.denoiser_options.items())),
        )
        if key not in self._samplers:
            self._samplers[key] = samplers.compile_sampler(
                self._network(),
                sampler=sampling.sampler,
                callback=None if self.on_step is None else self._report_step,
                sampler_options=sampling.sampler_options,
                **sampling.denoiser_options,
            )
        return self._samplers[key]

    def _report_step(self, step) -> None:
        if self.on_step is not None:
            self.on_step(int(step))

    def _network(self):
        """apply_fn(state, z, t, cond) of the denoising network, as the samplers call it."""
        graph = self._unet_graph

        def apply_fn(state, z, t, cond):
            unet = nnx.merge(graph, state)
            if "inpaint" in cond:  # the mask and the masked image's latents (diffusers' order)
                z = jnp.concatenate([z, cond["inpaint"].astype(z.dtype)], axis=-1)
            return unet(z, t, cond["text"], added_cond=cond.get("added"))

        return apply_fn

    def settings(self, **overrides) -> ml_collections.ConfigDict:
        """The call's `sample` group: the scheduler's settings with `overrides` (None: keep)."""
        sample = ml_collections.ConfigDict(self.sample.to_dict())
        for key, value in overrides.items():
            if value is not None:
                sample[key] = value
        return sample

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        negative_prompts: Sequence[str] | None = None,
        seed: int = 0,
        keys: jax.Array | None = None,
        noise: jax.Array | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        image: np.ndarray | None = None,
        image_latents: jax.Array | None = None,
        mask: np.ndarray | None = None,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        output: str = "image",
        **sample_overrides,
    ) -> LatentOutput:
        """Samples a batch of images (text-to-image, or image-to-image from `image`
        [B, H, W, 3] in [0, 1] or from `image_latents`, with `strength` or
        `denoising_start`; inpainting with `mask` [B, H, W] or [B, H, W, 1] in [0, 1],
        1 = repaint, the image's size). `sample_overrides` are further `sample` group keys
        (sampler, eta, guidance_rescale, karras, ...). output: "image" | "latent".

        Randomness: row r's initial noise and sampler noise come from `keys[r]` (default
        fold_in(key(seed), r)); `noise` [B, h, w, C] replaces the initial noise."""
        if output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        b = len(prompts)
        sample = self.settings(
            steps=steps,
            guidance_scale=guidance_scale,
            strength=strength,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            **sample_overrides,
        )
        sampling = diffusion_config.make_sampling(self.diffusion, sample)
        grid = sampling.grid
        inpaint = self._inpainting_inputs(image, mask, seed) if mask is not None else None
        if self.inpainting and inpaint is None:
            raise ValueError(
                f"{self.path}: an inpainting UNet ({self.unet_config.in_channels} input "
                f"channels: latents, mask, masked-image latents) needs `image` and `mask`"
            )
        init = None
        if image is not None or image_latents is not None:
            init = self._init_latents(image, image_latents, seed)
        if init is not None:
            h, w = init.shape[1:3]
        else:
            default = self.unet_config.sample_size * self.vae_scale
            if (height or default) % self.vae_scale or (width or default) % self.vae_scale:
                raise ValueError(
                    f"height and width must be multiples of {self.vae_scale}, got "
                    f"{height or default}x{width or default}"
                )
            h, w = (height or default) // self.vae_scale, (width or default) // self.vae_scale
        cond, uncond = self.conditioning(
            prompts,
            negative_prompts,
            height=h * self.vae_scale,
            width=w * self.vae_scale,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )
        shape = (b, h, w, self.latent_channels)
        if inpaint is not None and inpaint["mask"].shape[:3] != shape[:3]:
            raise ValueError(
                f"mask and image give {inpaint['mask'].shape[0]} images of latent size "
                f"{inpaint['mask'].shape[1:3]}; this call samples {shape[:3]}"
            )
        if keys is None:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(b))
        elif keys.shape != (b,):
            raise ValueError(f"keys has shape {keys.shape}; this call needs ({b},)")
        if noise is None:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape[1:]))(keys)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; this call needs {shape}")
        if init is None or (inpaint is not None and float(sample.strength) == 1.0):
            z = grid.init_sigma * noise  # inpainting at strength 1 starts from noise alone
        elif denoising_start:  # the refiner continues the base's partly denoised latents
            z = init
        else:
            z = grid.alpha[0] * init + grid.sigma[0] * noise
        guided = float(sample.guidance_scale) > 1.0
        editing = {}
        if inpaint is not None and self.inpainting:
            extra = inpaint["unet"]
            cond, uncond = dict(cond, inpaint=extra), dict(uncond, inpaint=extra)
        elif inpaint is not None:  # a text-to-image UNet: the samplers' masked sampling
            editing = dict(x_known=init, mask=inpaint["mask"])
        run = self._sampler(sampling)
        z, cond, uncond, keys, editing = self._place(
            (jnp.asarray(z, jnp.float32), cond, uncond, keys, editing), b
        )
        latents = run(
            self._unet_state,
            z,
            grid,
            cond,
            uncond if guided else None,
            jnp.float32(sample.guidance_scale) if guided else None,
            keys,
            **editing,
        )
        if editing:  # the kept region clean at the end, also where the grid's last level is
            # not (DDIM without set_alpha_to_one), as diffusers' last step puts it back
            latents = editing["mask"] * latents + (1.0 - editing["mask"]) * editing["x_known"]
        if output == "latent":
            return LatentOutput(None, latents)
        return LatentOutput(self.decode(latents), latents)

    def settings_record(self) -> dict:
        """What an image's metadata records about this pipeline."""
        return dict(
            path=self.path,
            family=self.family,
            diffusion=self.diffusion.to_dict(),
            sample=self.sample.to_dict(),
            weights_sha256=self.weights_sha256,
            **(lora_lib.file_record(self.lora) if self.lora else {}),
        )

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The directory's SHA-256 (read once: the weights do not change while loaded)."""
        return files.folder_sha256(self.path)

    def _inpainting_inputs(self, image, mask, seed) -> dict:
        """{"mask": the binarized mask at latent resolution [B, h, w, 1], "unet": it and the
        masked image's latents [B, h, w, 1 + C]} of an inpainting call."""
        if image is None:
            raise ValueError("inpainting needs `image` (the picture the mask refers to)")
        image = np.asarray(image, np.float32)
        mask = np.asarray(mask, np.float32)
        if mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be [B, H, W, 3] in [0, 1], got shape {image.shape}")
        if mask.shape != image.shape[:3]:
            raise ValueError(
                f"mask has shape {mask.shape}; the image needs {image.shape[:3]} (or with a "
                "trailing channel of 1)"
            )
        f = self.vae_scale
        if image.shape[1] % f or image.shape[2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {image.shape}")
        keep = (mask < 0.5).astype(np.float32)  # diffusers binarizes at 0.5
        small = (1.0 - keep)[:, ::f, ::f, None]  # nearest-neighbour, as F.interpolate
        masked = jnp.asarray((image * 2.0 - 1.0) * keep[..., None])
        key = jax.random.fold_in(jax.random.key(seed), (1 << 20) + 1)  # apart from the others
        latents = _encode_images(self._vae_graph, self._vae_state, masked, key)
        small = jnp.asarray(small)
        return {"mask": small, "unet": jnp.concatenate([small, latents], axis=-1)}

    def _init_latents(self, image, image_latents, seed):
        if image_latents is not None:
            return jnp.asarray(image_latents, jnp.float32)
        x = jnp.asarray(image, jnp.float32) * 2.0 - 1.0
        key = jax.random.fold_in(jax.random.key(seed), 1 << 20)  # apart from the noise keys
        return _encode_images(self._vae_graph, self._vae_state, x, key)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Latents -> images float32 [B, H, W, 3] in [0, 1]."""
        x = decode_latents(self._vae_graph, self._vae_state, jnp.asarray(latents, jnp.float32))
        return np.asarray(jnp.clip(x / 2 + 0.5, 0.0, 1.0))


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(graph, state, latents):
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in about [-1, 1], by the VAE
    `nnx.merge(graph, state)` (its scaling and shift undone)."""
    model = nnx.merge(graph, state)
    return model.images_from_latents(latents)


@functools.partial(jax.jit, static_argnums=0)
def _encode_images(graph, state, x, key):
    model = nnx.merge(graph, state)
    return model.latents_from_images(x, key)


def encode_images(graph, state, x, key=None):
    """Images [B, H, W, 3] in [-1, 1] -> scaled latents by the VAE `nnx.merge(graph,
    state)`: its posterior's mode, or a sample with `key`."""
    return _encode_images(graph, state, jnp.asarray(x, jnp.float32), key)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

# The compiled batch of a pipeline's text encoders: a prompt and its negative (CFG's pair).
# A larger one pads a one-image call's two prompts to its size: 8 took 7x the time of 2
# for SD's CLIP on the CPU (bench/README.md, sd_sampling.py); a row's encoding is the same
# in any of them.
PROMPT_BUCKET = 2

# diffusers' defaults for a call without guidance_scale: SD 7.5, SDXL 5.0.
DEFAULT_GUIDANCE = {"stable_diffusion": 7.5, "stable_diffusion_xl": 5.0}
DEFAULT_STEPS = 50


def load_sd_pipeline(
    path: str | os.PathLike, *, dtype=jnp.float32, lora: str | None = None
) -> LatentPipeline:
    """An SD 1.x / 2.x or SDXL (base or refiner) pipeline from a diffusers directory
    (`pipelines.public.load_latent_pipeline` takes any latent family). Every component is
    checked (present, of its class, fitting the others) before weights load. lora: a
    diffusers LoRA file (or a directory holding pytorch_lora_weights.safetensors) whose
    UNet adapters are merged into the UNet (`models.lora.apply_diffusers_lora`)."""
    path = os.fspath(path)
    index = diffusers_format.read_model_index(path)
    family = diffusers_format.family_of(index, path)
    if family.name not in DEFAULT_GUIDANCE:
        raise CheckpointError(
            f"{path} is a {index['_class_name']}; load it with the {family.name} loader"
        )
    encoder_names = ["text_encoder"]
    if family.name == "stable_diffusion_xl":
        encoder_names = [n for n in ("text_encoder", "text_encoder_2") if n in index]
    extra = [n for n in encoder_names if n != "text_encoder_2"]
    extra += ["tokenizer" for n in encoder_names if n == "text_encoder"]
    diffusers_format.check_components(path, index, family, extra=tuple(extra))
    unet_hf = diffusers_format.read_json(os.path.join(path, "unet", "config.json"), "unet")
    encoders = []
    for name in encoder_names:
        kind_check = diffusers_format.component_class(path, name)
        if not kind_check.startswith("CLIPTextModel"):
            raise CheckpointError(
                f"{os.path.join(path, name)} holds a {kind_check}; SD / SDXL need a CLIP text model"
            )
        encoders.append(
            load_text_encoder(
                os.path.join(path, name),
                "clip",
                dtype=dtype,
                hidden_layer=-2 if family.name == "stable_diffusion_xl" else None,
                model_mask=False,
                batch_bucket=PROMPT_BUCKET,
            )
        )
    width = sum(text_width_of(os.path.join(path, n)) for n in encoder_names)
    if unet_hf.get("cross_attention_dim") != width:
        raise CheckpointError(
            f"{path}/unet/config.json: cross_attention_dim={unet_hf.get('cross_attention_dim')} "
            f"does not fit the text encoders ({' + '.join(encoder_names)} give {width}): "
            "a UNet of another model family?"
        )
    unet, unet_config = sd_unet.load_unet(os.path.join(path, "unet"), dtype)
    lora_file = lora_lib.apply_diffusers_lora(unet, lora) if lora else ""
    autoencoder, _ = vae.load_vae(os.path.join(path, "vae"), dtype)
    c = autoencoder.config.latent_channels
    if unet_config.in_channels not in (c, 2 * c + 1):
        raise CheckpointError(
            f"{path}/unet/config.json: in_channels={unet_config.in_channels} fits neither "
            f"the VAE's {c} latent channels (text-to-image) nor {2 * c + 1} (inpainting: "
            "latents, mask, masked-image latents)"
        )
    diffusion, sample = diffusers_format.scheduler_settings(os.path.join(path, "scheduler"))
    sample.steps = DEFAULT_STEPS
    sample.guidance_scale = DEFAULT_GUIDANCE[family.name]
    model_index = diffusers_format.read_json(os.path.join(path, "model_index.json"), path)
    return LatentPipeline(
        path=path,
        family=family.name,
        unet=unet,
        unet_config=unet_config,
        vae=autoencoder,
        encoders=encoders,
        diffusion=diffusion,
        sample=sample,
        requires_aesthetics_score=bool(model_index.get("requires_aesthetics_score", False)),
        force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", True)),
        lora=lora_file,
    )


def text_width_of(folder: str) -> int:
    """The hidden width of a transformers text model directory (a CLIP's text tower)."""
    config = diffusers_format.read_json(os.path.join(folder, "config.json"), folder)
    if config.get("model_type") == "clip":
        config = config.get("text_config") or {}
    return int(config.get("hidden_size", 512))


class LatentJob:
    """A sampling job's callable over a latent pipeline (and an SDXL refiner): `job(items,
    seed) -> [uint8 images [B, H, W, 3]]`, as `jobs.run_job` drives a cascade. Row i's
    randomness comes from `jobs.image_key(seed, item, stage)` (stage 0: the base, 1: the
    refiner), so an image does not depend on its batch."""

    def __init__(
        self,
        base: LatentPipeline,
        refiner: LatentPipeline | None = None,
        *,
        refiner_start: float = 0.8,
        height=None,
        width=None,
        overrides=({}, {}),
        edit=None,
    ):
        if refiner is not None and not 0.0 < refiner_start < 1.0:
            raise ValueError(f"refiner_start must be in (0, 1), got {refiner_start}")
        if edit is not None and refiner is not None:
            raise ValueError(
                "--init_image / --mask edit with the SDXL base alone; leave out --refiner"
            )
        if edit is not None and edit.repaint_jump:
            raise ValueError(
                "--repaint_jump is for stage sets and DeepFloyd IF; SD / SDXL inpaint with "
                "their own UNets (or the samplers' masked sampling)"
            )
        if base.inpainting and (edit is None or edit.mask is None):
            raise ValueError(
                f"{base.path} has an inpainting UNet: give --init_image and --mask (white "
                "where the image is regenerated)"
            )
        self.base, self.refiner = base, refiner
        self.edit = edit  # an editing.EditRequest: every image starts from its image / mask
        self.refiner_start = refiner_start
        self.size = dict(height=height, width=width)
        self.overrides = overrides

    def settings(self) -> dict:
        """What the job's fingerprint and images' metadata record (`edit`: the request's
        files' SHA-256 and settings)."""
        stages = [dict(self.base.settings_record(), overrides=dict(self.overrides[0]))]
        if self.refiner is not None:
            stages.append(
                dict(
                    self.refiner.settings_record(),
                    overrides=dict(self.overrides[1]),
                    denoising_start=self.refiner_start,
                )
            )
        out = {"stages": stages, **self.size}
        return out if self.edit is None else dict(out, edit=self.edit.settings())

    def __call__(self, items, seed: int) -> list[np.ndarray]:
        prompts = [it.entry.prompt for it in items]
        negatives = [it.entry.negative_prompt for it in items]
        negatives = negatives if any(n.strip() for n in negatives) else None
        scale = items[0].entry.guidance_scale  # a prompt's own scale beats --set

        def kwargs(stage: int) -> dict:
            kw = dict(self.overrides[stage], negative_prompts=negatives)
            if scale is not None:
                kw["guidance_scale"] = scale
            kw["keys"] = jnp.stack([jobs.image_key(seed, it, stage) for it in items])
            return kw

        if self.edit is not None:
            edit = self._edit_inputs(len(items))
            return [_to_uint8(self.base(prompts, **edit, **kwargs(0)).images)]
        if self.refiner is None:
            return [_to_uint8(self.base(prompts, **self.size, **kwargs(0)).images)]
        handoff = self.base(
            prompts, denoising_end=self.refiner_start, output="latent", **self.size, **kwargs(0)
        )
        out = self.refiner(
            prompts,
            image_latents=handoff.latents,
            denoising_start=self.refiner_start,
            **kwargs(1),
        )
        return [_to_uint8(out.images)]

    def _edit_inputs(self, n: int) -> dict:
        """The base call's image ([0, 1]), mask and strength for n images of the output's
        size (the request's image and mask resized to it, antialiased bilinear)."""
        default = self.base.unet_config.sample_size * self.base.vae_scale
        h, w = self.size["height"] or default, self.size["width"] or default
        edit = self.edit.batch(n)
        image = np.asarray(images_lib.resize_batch(edit.image, (h, w)))
        out = dict(image=np.clip(image * 0.5 + 0.5, 0.0, 1.0), strength=edit.strength)
        if edit.mask is not None:
            mask = np.asarray(edit.mask)[..., None]
            out["mask"] = np.asarray(images_lib.resize_batch(mask, (h, w)))
        return out


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as diffusers' `numpy_to_pil` rounds."""
    return (np.asarray(images) * 255).round().astype(np.uint8)
