"""Stable Diffusion 3 / 3.5 from a diffusers directory (`StableDiffusion3Pipeline`):
text-to-image with the MMDiT (`models/sd3_transformer.py`) and rectified flow.

    pipe = load_sd3_pipeline("models/stable-diffusion-3-medium-diffusers")
    out = pipe(["a photo of a cat holding a sign"], seed=0)   # 28 steps, guidance 7.0
    out.images  # float32 [B, H, W, 3] in [0, 1]

`pipelines.public.load_latent_pipeline` hands an SD 3 directory here, so
`sample.py --pipeline=DIR` and `LatentJob` take it like any other latent pipeline.

The numerics are diffusers': the text goes through three encoders as `encode_prompt` does
it, the penultimate layer of both CLIPs (77 tokens each) concatenated on the channels and
zero-padded to the T5 width, then the T5's last layer (`max_sequence_length` tokens, no
attention mask) appended on the sequence; the pooled vector is both CLIPs' projected pooled
outputs concatenated. A directory without the T5 (model_index lists it as null) gets zeros
in its place, as diffusers does. The negative prompt defaults to "" (encoded, not zeros);
the scheduler is FlowMatchEulerDiscreteScheduler (`diffusers_format.scheduler_settings`:
its `shift`, linspace sigmas, the network told sigma * 1000); the latents are decoded after
undoing the VAE's scaling and shift factors. Sampling, CFG batching, seeds and noise work as
in `LatentPipeline` (module `latent`), which this class extends.

Not implemented: SD 3.5's skip-layer guidance, ControlNets, IP-adapters, image-to-image
and inpainting for SD 3, and `use_dynamic_shifting` schedulers (refused by name).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import lora as lora_lib
from imagen_jax.models import sd3_transformer, vae
from imagen_jax.pipelines import diffusers_format
from imagen_jax.pipelines.latent import PROMPT_BUCKET, LatentPipeline, text_width_of
from imagen_jax.text.encoder import load_text_encoder
from imagen_jax.text.joint import JointTextEncoder, penultimate_clips
from imagen_jax.weights import CheckpointError

FAMILY = "stable_diffusion_3"
DEFAULT_STEPS = 28  # StableDiffusion3Pipeline.__call__'s defaults
DEFAULT_GUIDANCE = 7.0
MAX_SEQUENCE_LENGTH = 256


@dataclasses.dataclass
class SD3Pipeline(LatentPipeline):
    """A loaded SD 3 pipeline: `unet` holds the MMDiT, `encoders` are [CLIP-L, CLIP-G, T5 or
    None]."""

    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def _encode(self, prompts: Sequence[str]):
        clip_l, clip_g, t5 = self.encoders
        joint = JointTextEncoder(
            [clip_l, clip_g],
            pooled="concat",
            sequence=t5,
            width=self.unet_config.joint_attention_dim,
            sequence_length=self.max_sequence_length,
        )
        out = joint.encode(prompts)
        return out.embeddings, out.pooled

    def conditioning(self, prompts, negative_prompts=None, **unused):
        """(cond, uncond) trees {"text": [B, 77 + L, D], "pooled": [B, P]}."""
        (tokens, pooled), (neg_tokens, neg_pooled) = self._encode_pairs(prompts, negative_prompts)
        return {"text": tokens, "pooled": pooled}, {"text": neg_tokens, "pooled": neg_pooled}

    def _network(self):
        graph = self._unet_graph

        def apply_fn(state, z, t, cond):
            return nnx.merge(graph, state)(z, t, cond["text"], cond["pooled"])

        return apply_fn

    def __call__(self, prompts, *, height=None, width=None, **kwargs):
        multiple = self.vae_scale * self.unet_config.patch_size
        default = self.unet_config.sample_size * self.vae_scale
        for name, value in (("height", height), ("width", width)):
            if (value or default) % multiple:
                raise ValueError(
                    f"{name}={value} must be a multiple of {multiple} (the VAE's factor "
                    f"{self.vae_scale} times the transformer's patch size)"
                )
        if kwargs.get("image") is not None or kwargs.get("image_latents") is not None:
            raise NotImplementedError("image-to-image is not implemented for SD 3")
        return super().__call__(prompts, height=height, width=width, **kwargs)


def load_sd3_pipeline(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    lora: str | None = None,
) -> SD3Pipeline:
    """An SD 3 / 3.5 pipeline from a diffusers directory. Every component is checked
    (present, of its class, fitting the transformer's widths) before weights load. lora: a
    diffusers LoRA file (or a directory holding pytorch_lora_weights.safetensors) whose
    transformer adapters are merged into the transformer."""
    path = os.fspath(path)
    index = diffusers_format.read_model_index(path)
    family = diffusers_format.family_of(index, path)
    if family.name != FAMILY:
        raise CheckpointError(f"{path} is a {index['_class_name']}, not a StableDiffusion3Pipeline")
    has_t5 = "text_encoder_3" in index
    extra = ("text_encoder_3", "tokenizer_3") if has_t5 else ()
    diffusers_format.check_components(path, index, family, extra=extra)
    hf = diffusers_format.read_json(os.path.join(path, "transformer", "config.json"), "transformer")
    joint, pooled_dim = hf.get("joint_attention_dim"), hf.get("pooled_projection_dim")
    clip_widths = [text_width_of(os.path.join(path, n)) for n in ("text_encoder", "text_encoder_2")]
    projections = [
        _projection_dim(os.path.join(path, n)) for n in ("text_encoder", "text_encoder_2")
    ]
    where = f"{path}/transformer/config.json"
    if pooled_dim != sum(projections):
        raise CheckpointError(
            f"{where}: pooled_projection_dim={pooled_dim} does not fit the CLIP encoders' "
            f"projections ({' + '.join(map(str, projections))}): a transformer of another model?"
        )
    if joint is None or joint < sum(clip_widths):
        raise CheckpointError(
            f"{where}: joint_attention_dim={joint} is narrower than the CLIP encoders' "
            f"{' + '.join(map(str, clip_widths))} channels"
        )
    encoders = penultimate_clips(path, dtype=dtype, batch_bucket=PROMPT_BUCKET)
    if has_t5:
        t5_dir = os.path.join(path, "text_encoder_3")
        t5_width = diffusers_format.read_json(os.path.join(t5_dir, "config.json"), t5_dir)
        if t5_width.get("d_model") != joint:
            raise CheckpointError(
                f"{where}: joint_attention_dim={joint} does not fit {t5_dir}'s "
                f"d_model={t5_width.get('d_model')}"
            )
        encoders.append(
            load_text_encoder(
                t5_dir,
                "t5",
                dtype=dtype,
                max_length=max_sequence_length,
                model_mask=False,
                pooling="none",
                batch_bucket=PROMPT_BUCKET,
            )
        )
    else:
        encoders.append(None)
    transformer, config = sd3_transformer.load_sd3_transformer(
        os.path.join(path, "transformer"), dtype=dtype
    )
    lora_file = ""
    if lora:
        lora_file = lora_lib.apply_diffusers_lora(transformer, lora, prefix="transformer")
    autoencoder, _ = vae.load_vae(os.path.join(path, "vae"), dtype)
    if autoencoder.config.latent_channels != config.in_channels:
        raise CheckpointError(
            f"{path}/vae has {autoencoder.config.latent_channels} latent channels; the "
            f"transformer takes {config.in_channels}"
        )
    diffusion, sample = diffusers_format.scheduler_settings(os.path.join(path, "scheduler"))
    sample.steps = DEFAULT_STEPS
    sample.guidance_scale = DEFAULT_GUIDANCE
    return SD3Pipeline(
        path=path,
        family=FAMILY,
        unet=transformer,
        unet_config=config,
        vae=autoencoder,
        encoders=encoders,
        diffusion=diffusion,
        sample=sample,
        max_sequence_length=max_sequence_length,
        lora=lora_file,
    )


def _projection_dim(folder: str) -> int:
    config = diffusers_format.read_json(os.path.join(folder, "config.json"), folder)
    if config.get("model_type") == "clip":
        config = config.get("text_config") or {}
    return int(config.get("projection_dim", 512))
