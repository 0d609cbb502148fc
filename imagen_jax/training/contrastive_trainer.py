"""`train_contrastive(config, workdir)`: trains an image-text embedding model
(`model.family = "two_towers"`) with the contrastive step and writes it as a directory that
`pipelines.embedding.load_embedder` reads.

    state, metrics = train_contrastive(config, workdir)   # or train_and_evaluate: it dispatches
    python -m imagen_jax.training.export --config=configs/shapes_embedding.py \
        --workdir=runs/shapes_embedding --outdir=checkpoints/shapes/embedding [--step=N]

The run is the shared loop (`loop.train_and_export`: mesh, data pipeline, sharded state with
EMA, Orbax checkpoints with resume, metrics.jsonl and TensorBoard, the NaN stop) with the
contrastive step (`contrastive_step.py`). The text side (`model.text_side`): "frozen" encodes
the captions with the `text` group's frozen encoder (all-MiniLM-L6-v2) in the loop, as the
diffusion trainer does, its counterfactual captions too when `contrastive.hard_negatives`
(`data.counterfactuals`); "tower" tokenizes them on the host with the MiniLM WordPiece
tokenizer for a text tower trained from scratch.

Every `evals.every` steps the EMA weights run the embedding evaluators of `evals.metrics`
(`evaluation.retrieval`: zero-shot colour and shape, retrieval recall, the compositional
hard negatives, on the shapes scenes of `evals.splits`): `eval/<metric>` in metrics.jsonl,
and a JSON report in `workdir/evals/`.

When the run reaches `train.steps`, process 0 writes `workdir/embedding/` from the EMA
weights (`export.export_embedding` writes one from any checkpoint): text_side "frozen",
`models.frozen_text_towers`' directory (float16 weights, the frozen encoder's text group);
"tower", a transformers SiglipModel / CLIPModel directory (`two_towers.save_siglip`, float32)
with the MiniLM tokenizer. Both carry preprocessor_config.json.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from imagen_jax.config_utils import ConfigError
from imagen_jax.evaluation import retrieval
from imagen_jax.images import ImageProcessor, clip_preprocessor_config
from imagen_jax.models import frozen_text_towers, two_towers
from imagen_jax.pipelines import embedding
from imagen_jax.text.config import make_text_encoder, text_width
from imagen_jax.training import caption_step, caption_trainer, contrastive_step, loop
from imagen_jax.training import input as input_lib
from imagen_jax.training import state as state_lib
from imagen_jax.training.config import check_config
from imagen_jax.training.contrastive import LOSSES

EXPORT_DIR = "embedding"


def check_contrastive(config, net) -> None:
    """ConfigError, one line, for settings of the family that cannot work together."""
    cfg, frozen = config.contrastive, contrastive_step.frozen_text_side(net)
    if cfg.loss not in LOSSES:
        raise ConfigError(f"contrastive.loss={cfg.loss!r}; expected one of {LOSSES}")
    has_bias = net.cfg.logit_bias if frozen else net.cfg.family == "siglip"
    if has_bias != (cfg.loss == "sigmoid"):
        raise ConfigError(
            f"contrastive.loss={cfg.loss!r} with model.logit_bias={has_bias}: the sigmoid "
            "loss needs the learnable bias (logit_bias=True), the softmax loss has none"
        )
    if cfg.frozen_tower == "text" and frozen:
        raise ConfigError(
            "contrastive.frozen_tower='text' with model.text_side='frozen': that text side is "
            "a frozen encoder already (freeze 'image' or nothing)"
        )
    if cfg.hard_negatives and not (frozen and input_lib.counterfactual_kinds(config.data)):
        raise ConfigError(
            "contrastive.hard_negatives needs model.text_side='frozen' and "
            "data.counterfactuals (the shapes source's counterfactual captions)"
        )
    if config.train.sample_every:
        raise ConfigError(
            f"train.sample_every={config.train.sample_every}: an embedding model has no "
            "sample grid (set 0; evals.every runs its evaluators)"
        )


def frozen_encoder(config, net):
    """The `text` group's encoder, checked to give the width the text projection reads."""
    encoder = make_text_encoder(
        config.text, batch_size=config.data.batch_size // jax.process_count()
    )
    width = text_width(encoder)
    if width != net.text_dim:
        raise ValueError(
            f"the text encoder gives {width}-dim embeddings but the model's text projection "
            f"reads model.text_dim={net.text_dim}"
        )
    return encoder


def processor_of(config) -> ImageProcessor:
    return ImageProcessor.from_hf(preprocessor(config))


def preprocessor(config) -> dict:
    m = config.model
    return clip_preprocessor_config(m.resolution, m.image_mean, m.image_std)


class EmbeddingEvaluation:
    """`evaluation(step, ema_params, rest) -> metrics` (names prefixed by "eval/"): the
    embedding evaluators on the EMA weights; process 0 writes `workdir/evals/step_N.json`."""

    def __init__(self, config, net, workdir: str, *, encoder=None, tokenizer=None):
        self.net, self.workdir = net, workdir
        self.kw = dict(encoder=encoder, tokenizer=tokenizer, name=workdir)
        self.processor = processor_of(config)
        self.batch_size = int(config.evals.batch_size)
        self.evaluators = retrieval.make_embedding_evaluators(
            config.evals, resolution=config.model.resolution
        )

    def __call__(self, step: int, ema_params, rest) -> dict[str, float]:
        model = self.net.merge(jax.device_get(ema_params), jax.device_get(rest))
        embedder = embedding.model_embedder(
            model, self.processor, batch_size=self.batch_size, **self.kw
        )
        metrics = retrieval.run_embedding_evaluators(self.evaluators, embedder)
        if jax.process_index() == 0:
            folder = os.path.join(self.workdir, "evals")
            os.makedirs(folder, exist_ok=True)
            report = {
                "step": step,
                "evaluators": [e.describe() for e in self.evaluators],
                "metrics": metrics,
            }
            with open(os.path.join(folder, f"step_{step:08d}.json"), "w") as f:
                json.dump(report, f, indent=2)
        return {f"eval/{k}": v for k, v in metrics.items()}


def train_contrastive(config: ml_collections.ConfigDict, workdir: str):
    """Trains the embedding model of `config` in `workdir` (resuming from its checkpoints),
    then exports `workdir/embedding/`. Returns (final TrainState, metrics of the last logged
    step). A run that SIGTERM stops early raises `loop.Preempted` and exports nothing."""
    check_config(config)
    net = state_lib.make_network(config.model)
    check_contrastive(config, net)
    frozen = contrastive_step.frozen_text_side(net)
    encoder = frozen_encoder(config, net) if frozen else None
    tokenizer = None if frozen else caption_step.make_tokenizer_of(config.contrastive.max_length)

    def make_data(c):
        data = input_lib.make_input(c)
        return data if frozen else caption_trainer.TokenizedCaptions(data, tokenizer)

    def make_evaluation(net, mesh):
        if not config.evals.every:
            return None
        return EmbeddingEvaluation(config, net, workdir, encoder=encoder, tokenizer=tokenizer)

    return loop.train_and_export(
        config,
        workdir,
        make_data=make_data,
        make_step=contrastive_step.make_contrastive_train_step,
        make_grid=None,
        export=lambda net, params: write_embedding_model(
            os.path.join(workdir, EXPORT_DIR), config, net, params
        ),
        encoder=encoder,
        make_optimizer=contrastive_step.make_optimizer,
        make_evaluation=make_evaluation,
    )


def write_embedding_model(outdir: str, config, net, params, *, identity=None) -> str:
    """Writes `params` (host arrays) of the embedding model `net` as a directory that
    `pipelines.embedding.load_embedder` reads; returns outdir."""
    params = jax.tree.map(np.asarray, params)
    if contrastive_step.frozen_text_side(net):
        frozen_text_towers.save_frozen_text_towers(
            outdir,
            net.cfg,
            params,
            text={**config.text.to_dict(), "cache": ""},
            processor=preprocessor(config),
            identity=identity,
        )
    else:
        model = net.build(nnx.Rngs(0))
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        save = two_towers.save_siglip if net.cfg.family == "siglip" else two_towers.save_clip
        save(outdir, model)
        for name in caption_trainer.TOKENIZER_FILES:
            src = os.path.join(caption_step.tokenizer_dir(), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(outdir, name))
        with open(os.path.join(outdir, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor(config), f, indent=2)
    embedding.model_kind(outdir)  # what we wrote is a directory the loader takes
    logging.info("Wrote the embedding model to %s", outdir)
    return outdir
