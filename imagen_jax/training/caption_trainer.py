"""`train_captioner(config, workdir)`: trains a GIT captioner (`model.family = "git"`) on the
data's (image, caption) pairs and writes it as a Hugging Face-layout directory that
`pipelines.captioning.load_captioner` and transformers' `GitForCausalLM` read.

    state, metrics = train_captioner(config, workdir)   # or train_and_evaluate: it dispatches
    python -m imagen_jax.training.export --config=configs/shapes_captioner.py \
        --workdir=runs/shapes_captioner --outdir=checkpoints/shapes/captioner [--step=N]

The run is the shared loop (`loop.train_loop`: mesh, data pipeline, sharded state with EMA,
Orbax checkpoints with resume, metrics.jsonl and TensorBoard, the NaN stop) with the
captioning step (`caption_step.py`). The captions are tokenized on the host by the frozen
MiniLM's BERT WordPiece tokenizer (`TokenizedCaptions`: [CLS] caption [SEP], padded to
`caption_loss.max_length`), the tokenizer the exported directory ships.

Every `train.sample_every` steps the EMA weights greedily caption `train.num_samples`
images: held-out scenes of the shapes domain when the data is the shapes source (colour-shape
pairs and layouts training never shows), else the first batch's images; the captions, with
the true ones, go to the log and to `workdir/samples/captions.jsonl`.

When the run reaches `train.steps`, process 0 writes `workdir/captioner/` from the EMA
weights (`export.export_captioner` writes one from any checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from imagen_jax.data import ShapesSource
from imagen_jax.images import ImageProcessor, clip_preprocessor_config
from imagen_jax.models import git
from imagen_jax.pipelines import captioning
from imagen_jax.text.tokenizer import Tokenizer
from imagen_jax.training import caption_step, loop
from imagen_jax.training import input as input_lib
from imagen_jax.training.config import check_config

EXPORT_DIR = "captioner"
# The MiniLM tokenizer's files, shipped beside the weights (BERT WordPiece, lower case).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


tokenizer_dir = caption_step.tokenizer_dir


def make_tokenizer(config) -> Tokenizer:
    return caption_step.make_tokenizer_of(config.caption_loss.max_length)


class TokenizedCaptions(grain.DatasetIterator):
    """The batches of `data` plus "caption_ids" and "caption_mask" (int32 [B, L]) of their
    captions. Its state is the wrapped iterator's: checkpoints and resumption are unchanged."""

    def __init__(self, data, tokenizer: Tokenizer):
        super().__init__(data)
        self.tokenizer = tokenizer

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._parent)
        tokens = self.tokenizer(list(batch["caption"]))
        return dict(batch, caption_ids=tokens.input_ids, caption_mask=tokens.attention_mask)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


def decoding(config, net) -> captioning.Decoding:
    """Greedy decoding with the config's special tokens, up to `caption_loss.sample_max_length`."""
    return captioning.Decoding(
        max_length=config.caption_loss.sample_max_length,
        eos_token_id=net.cfg.eos_token_id,
        pad_token_id=net.cfg.pad_token_id,
    )


def sample_images(config, first_batch) -> tuple[np.ndarray, list[str]]:
    """The images the periodic samples caption, uint8 [N, S, S, 3], and their true captions:
    held-out shapes scenes when the data is the shapes source, else the first batch's."""
    n = config.train.num_samples
    if config.data.source == "shapes":
        source = ShapesSource(split="heldout", resolution=config.data.resolution, seed=1234)
        records = [source[i] for i in range(n)]
        return np.stack([r["image"] for r in records]), [r["caption"] for r in records]
    images = np.asarray(jax.device_get(first_batch["image"]))[:n]
    return images, [""] * len(images)


class CaptionSamples:
    """`samples(step, ema_params, rest)` greedily captions the sample images with the EMA
    weights, logs them with their true captions and (process 0) appends them to
    `workdir/samples/captions.jsonl`; returns the captions."""

    def __init__(self, config, net, workdir: str, first_batch, tokenizer: Tokenizer):
        self.workdir, self.tokenizer, self.net = workdir, tokenizer, net
        images, self.truths = sample_images(config, first_batch)
        norm = dict(mean=config.model.image_mean, std=config.model.image_std)
        self._pixels = np.asarray(caption_step.pixel_values(jnp.asarray(images), **norm))
        self._decoding = decoding(config, net)
        self._vocab = caption_step.output_vocab(config)

    def __call__(self, step: int, ema_params, rest) -> list[str]:
        model = self.net.merge(caption_step.with_vocab_bias(ema_params, self._vocab), rest)
        out = captioning.generate(model, self._pixels, self._decoding)
        rows = [s[:n] for s, n in zip(out.sequences, out.lengths, strict=True)]
        captions = self.tokenizer.decode(rows)
        for caption, truth in zip(captions, self.truths, strict=True):
            logging.info("step %d caption: %r (true: %r)", step, caption, truth)
        if jax.process_index() == 0:
            folder = os.path.join(self.workdir, "samples")
            os.makedirs(folder, exist_ok=True)
            line = {"step": step, "captions": captions, "true": self.truths}
            with open(os.path.join(folder, "captions.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
        return captions


def train_captioner(config: ml_collections.ConfigDict, workdir: str):
    """Trains the captioner of `config` in `workdir` (resuming from its checkpoints), then
    exports `workdir/captioner/`. Returns (final TrainState, metrics of the last logged
    step). A run that SIGTERM stops early raises `loop.Preempted` and exports nothing."""
    check_config(config)
    tokenizer = make_tokenizer(config)
    return loop.train_and_export(
        config,
        workdir,
        make_data=lambda c: TokenizedCaptions(input_lib.make_input(c), tokenizer),
        make_step=caption_step.make_caption_train_step,
        make_grid=lambda net, mesh, batch: CaptionSamples(config, net, workdir, batch, tokenizer),
        export=lambda net, params: write_captioner(
            os.path.join(workdir, EXPORT_DIR), config, net, params
        ),
    )


def write_captioner(outdir: str, config, net, params, *, dtype=np.float16) -> str:
    """Writes `params` (host arrays) of the captioner `net` as a Hugging Face GIT directory:
    config.json, model.safetensors (in `dtype`), the MiniLM tokenizer's files,
    preprocessor_config.json (CLIP's processor at the training size, the training mean/std)
    and generation_config.json. Returns outdir."""
    vocab = caption_step.output_vocab(config)  # tokens the softmax never saw: never predicted
    params = jax.tree.map(np.asarray, caption_step.with_vocab_bias(params, vocab))
    git.save_git(outdir, params, net.cfg, dtype=dtype)
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir(), name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(outdir, name))
    processor = clip_preprocessor_config(
        config.model.resolution, config.model.image_mean, config.model.image_std
    )
    cfg = net.cfg
    eos = list(cfg.eos_token_id)
    generation = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": cfg.pad_token_id,
        "max_length": config.caption_loss.sample_max_length,
    }
    for name, content in (
        ("preprocessor_config.json", processor),
        (captioning.GENERATION_CONFIG, generation),
    ):
        with open(os.path.join(outdir, name), "w") as f:
            json.dump(content, f, indent=2)
    ImageProcessor.from_dir(outdir)  # the processor we wrote is one the loader reads
    logging.info("Wrote the captioner to %s", outdir)
    return outdir
