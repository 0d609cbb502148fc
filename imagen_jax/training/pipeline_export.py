"""A public pipeline trained further (`model.family = "pipeline"`), written back for diffusers
and `sample.py --pipeline`:

- full fine-tuning: a copy of the pipeline directory (`model.pipeline`) whose unet/ (SD 3:
  transformer/) holds the run's weights (diffusers' names and layouts,
  `diffusion_pytorch_model.safetensors`, the same config.json); diffusers' `from_pretrained`
  and `sample.py --pipeline=OUTDIR` read it.
- adapters (`model.lora.rank > 0`): OUTDIR/pytorch_lora_weights.safetensors in the format
  diffusers' `load_lora_weights(OUTDIR)` reads (`models.lora.diffusers_tensors`: peft names,
  the scale folded in); `sample.py --pipeline=BASE --lora=OUTDIR` samples the base pipeline
  with them merged.

Either way OUTDIR/finetune.json records where the weights came from (the base pipeline, the
workdir, the step, EMA or not, the adapters' rank, alpha and layers). OUTDIR must not hold
files already: an export never mixes with an older one.

    python -m imagen_jax.training.export --config=configs/sd_finetune.py:pipeline=BASE,... \
        --workdir=runs/sd_photos --outdir=runs/sd-photos [--step=N] [--noema]
"""

from __future__ import annotations

import json
import os
import shutil

from safetensors.numpy import save_file

from imagen_jax import stages
from imagen_jax.models import latent_mmdit, sd3_transformer, sd_unet
from imagen_jax.models import lora as lora_lib
from imagen_jax.weights import checkpoint_tensors
from imagen_jax.weights.hf import DIFFUSERS_WEIGHTS_NAME

RECORD = lora_lib.EXPORT_RECORD
STORAGE_DTYPES = stages.STORAGE_DTYPES


def _weight_file(name: str) -> bool:
    """A file of a diffusers model folder that holds (or indexes) its weights."""
    return name.startswith("diffusion_pytorch_model") and name.endswith(
        (".safetensors", ".bin", ".index.json")
    )


def _check_outdir(outdir: str) -> None:
    if os.path.isdir(outdir) and os.listdir(outdir):
        raise FileExistsError(
            f"--outdir={outdir} already holds files; export into a new or empty directory"
        )


def write_finetuned(
    outdir: str, config, net, params, *, identity: dict, dtype: str = "float32"
) -> str:
    """Writes the run's weights `params` (the network's tree: the UNet, or the adapters)
    as the module docstring says; returns the path of what diffusers loads (the pipeline
    directory, or the LoRA file's directory)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {tuple(STORAGE_DTYPES)}")
    _check_outdir(outdir)
    pipeline = config.model.pipeline
    record = dict(pipeline=os.path.abspath(pipeline), family=config.model.expect, **identity)
    name = denoiser_name(net)
    if net.lora is not None:
        os.makedirs(outdir, exist_ok=True)
        tensors = lora_lib.diffusers_tensors(params[name], _inner_spec(net.lora), prefix=name)
        tensors = {k: v.astype(STORAGE_DTYPES[dtype]) for k, v in tensors.items()}
        save_file(
            tensors, os.path.join(outdir, lora_lib.LORA_WEIGHTS_NAME), metadata={"format": "pt"}
        )
        record["lora"] = dict(
            rank=net.lora.rank,
            alpha=net.lora.alpha,
            targets=config.model.lora.targets,
            layers=len(net.lora.paths),
        )
    else:
        shutil.copytree(
            pipeline,
            outdir,
            dirs_exist_ok=True,
            ignore=lambda d, names: (
                [n for n in names if _weight_file(n)] if os.path.basename(d) == name else []
            ),
        )
        file = os.path.join(outdir, name, DIFFUSERS_WEIGHTS_NAME)
        save_file(_tensors(net, params[name], dtype), file, metadata={"format": "pt"})
    with open(os.path.join(outdir, RECORD), "w") as f:
        json.dump(record, f, indent=2)
    return outdir


def denoiser_name(net) -> str:
    """The pipeline's folder (and the network's parameter subtree) of the trained model."""
    return "transformer" if isinstance(net.cfg, latent_mmdit.PipelineMMDiTConfig) else "unet"


def _tensors(net, weights, dtype: str) -> dict:
    """The trained model's weights as diffusers' tensors (SD 3: with its position table, a
    fixed buffer computed from the config, which `pipeline_start` checked the pipeline's
    equals)."""
    if denoiser_name(net) == "unet":
        key_map, what = sd_unet.hf_key_map(net.cfg.unet), "SDUNet"
    else:
        cfg, what = net.cfg.transformer, "SD3Transformer"
        key_map = sd3_transformer.hf_key_map(cfg)
        if cfg.pos_embed_max_size is not None:
            m = cfg.pos_embed_max_size
            table = sd3_transformer.sincos_pos_table(cfg.inner_dim, m, m, cfg.base_size)[None]
            pos_embed = dict(weights.get("pos_embed", {}), pos_embed=table)
            weights = dict(weights, pos_embed=pos_embed)
    return checkpoint_tensors(weights, key_map, dtype=STORAGE_DTYPES[dtype], what=what)


def _inner_spec(spec: lora_lib.LoraSpec) -> lora_lib.LoraSpec:
    """The spec with its paths inside the model (the network's tree is {"unet": ...} or
    {"transformer": ...})."""
    return lora_lib.LoraSpec(spec.rank, spec.alpha, tuple(p[1:] for p in spec.paths))
