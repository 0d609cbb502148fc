"""The captioner's train step: teacher-forced next-token cross-entropy, one jitted update
(state donated).

    train_step = make_caption_train_step(config, net, tx, lr_schedule, mesh, shardings, rest)
    state, metrics = train_step(state, rest, batch)
    # batch: {"image": uint8 [B, H, W, 3], "caption_ids", "caption_mask": int32 [B, L]}

GIT's objective (Wang et al. 2022, sec. 2.2): the language-modelling loss of the caption
given the image tokens, each text position predicting the next token,

    L = sum_{b, i} m_{b, i+1} CE(y_{b, i+1}, p(. | image_b, y_{b, <=i})) / sum m_{b, i+1},

over the caption's tokens only: the image tokens predict nothing, the [CLS] that starts a
caption is never a target, its [SEP] is (so the model learns where to stop), and padding is
masked. With `caption_loss.vocab = "shapes"` the softmax runs over the tokens the shapes
grammar writes only (`shapes_vocab`, about 80 of the 30,522): the same loss as the full
softmax with every other token's logit at -inf, which the export makes (nearly) true by
giving those tokens the bias `OUTSIDE_VOCAB_BIAS`; it spares the LM head over the whole
vocabulary, most of a step's cost. `caption_loss.label_smoothing` > 0 mixes the one-hot
target with the uniform distribution over the softmax's tokens (Szegedy et al. 2016, sec. 7).

The images are normalised as the exported preprocessor_config.json says: (x / 255 - mean) /
std with `model.image_mean` / `model.image_std`. Gradient accumulation, the optimizer,
clipping and the EMA are the diffusion step's (`step.make_grad_fn`, `step.make_update`).
Metrics: those of `step.make_train_step`, and token_acc (argmax = target, over the targets).

With `caption_loss.cell_weight` > 0 (a conv image tower with `conv_cell_classes`, data with
"cell_labels": the shapes source's `data.cell_labels`), the loss adds that weight times
`cell_loss`: the tower's per-cell classifier against what each cell shows, the mean of the
cross-entropy over the cells with an object and over the background cells (so that the few
object cells are not drowned). Metrics cell_loss and cell_acc (over the object cells).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.text.config import _minilm_path
from imagen_jax.text.tokenizer import Tokenizer
from imagen_jax.training import state as state_lib
from imagen_jax.training import step as step_lib

# The bias the export gives the LM head's tokens outside `caption_loss.vocab`: a logit no
# trained token comes near, so neither our greedy/beam search nor transformers' picks them.
OUTSIDE_VOCAB_BIAS = -1.0e4


def output_vocab(config) -> np.ndarray | None:
    """The sorted token ids the softmax runs over: `caption_loss.vocab` "shapes" (the tokens
    of the shapes grammar's captions, `shapes_vocab`) or "" (the whole vocabulary: None)."""
    name = config.caption_loss.vocab
    if not name:
        return None
    if name != "shapes":
        raise ValueError(f"caption_loss.vocab={name!r}; expected 'shapes' or ''")
    return shapes_vocab()


def tokenizer_dir() -> str:
    """The directory of the tokenizer the captioner is trained with: the frozen MiniLM's."""
    return _minilm_path()


def make_tokenizer_of(max_length: int) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir(), max_length)


@functools.cache
def shapes_vocab(max_length: int = 64) -> np.ndarray:
    """The MiniLM WordPiece ids of every word the shapes grammar writes, and [SEP]: the
    tokens of its vocabulary lists and of 4,000 captions drawn from both splits."""
    from imagen_jax.shapes import grammar, spec, tasks

    words = [
        *spec.COLORS, *spec.SHAPES, *spec.PLURALS.values(), *spec.BACKGROUNDS,
        *grammar.NUMBER_WORDS.values(), *grammar.FRAMES,
        *(w for ws in grammar.SIZE_WORDS.values() for w in ws),
        *(w for ws in grammar.RELATION_WORDS.values() for w in ws),
        *(w for ws in grammar.SIDE_WORDS.values() for w in ws),
        "there is are exactly that on against with background and a an the , .",
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    for split in ("train", "heldout"):
        words += [tasks.sample_example(rng, split=split).caption for _ in range(300)]
    tokens = make_tokenizer_of(max_length)(words)
    return np.unique(tokens.input_ids[tokens.attention_mask > 0]).astype(np.int32)


def with_vocab_bias(params, vocab):
    """`params` with the LM head's bias at `OUTSIDE_VOCAB_BIAS` outside `vocab` (None: as
    they are): the network that predicts only what the training softmax covered."""
    if vocab is None:
        return params
    bias = params["output"]["bias"]
    masked = jnp.full_like(bias, OUTSIDE_VOCAB_BIAS).at[vocab].set(bias[vocab])
    return {**params, "output": {**params["output"], "bias": masked}}


def pixel_values(images, *, mean, std):
    """uint8 [B, H, W, 3] -> float32 (x / 255 - mean) / std, CLIP's preprocessing without
    its resize (the training images are already the tower's size)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def caption_loss(model, pixels, ids, mask, *, vocab=None, label_smoothing: float = 0.0, image=None):
    """(loss, {"token_acc", "oov_tokens"}) of `model` (a GitForCausalLM) on preprocessed
    pixels and captions (ids, mask [B, L], [CLS] first).

    vocab: None, or the sorted token ids [K] the softmax runs over (the LM head's columns of
    the domain's tokens; targets outside it are not trained on and counted as oov_tokens).
    image: the image tokens [B, N, D] already encoded, in place of pixels."""
    h = model.text_hidden(pixels, ids, mask, image=image)[:, :-1]  # [B, L-1, D]
    targets = ids[:, 1:]
    weights = mask[:, 1:].astype(jnp.float32)
    kernel, bias = model.output.kernel[...], model.output.bias[...]
    if vocab is not None:
        vocab = jnp.asarray(vocab, jnp.int32)
        kernel, bias = kernel[:, vocab], bias[vocab]
        index = jnp.searchsorted(vocab, targets)  # [B, L-1] positions in vocab
        index = jnp.minimum(index, vocab.shape[0] - 1)
        known = vocab[index] == targets
        oov = ((~known) & (weights > 0)).sum()
        weights, targets = weights * known, index
    else:
        oov = jnp.zeros((), jnp.int32)
    logits = (h @ kernel + bias).astype(jnp.float32)  # [B, L-1, K]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L-1]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    total = jnp.maximum(weights.sum(), 1.0)
    hits = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    metrics = {"token_acc": (hits * weights).sum() / total, "oov_tokens": oov.astype(jnp.float32)}
    return (nll * weights).sum() / total, metrics


def cell_loss(logits, labels):
    """(loss, {"cell_loss", "cell_acc"}) of per-cell logits [B, N, K] against int labels
    [B, n, n] (N = n * n, row-major; 0 = background): the mean of the mean cross-entropy
    over object cells and over background cells; cell_acc over the object cells."""
    labels = labels.reshape(labels.shape[0], -1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    objects = (labels > 0).astype(jnp.float32)
    background = 1.0 - objects

    def mean(x, w):
        return (x * w).sum() / jnp.maximum(w.sum(), 1.0)

    loss = 0.5 * (mean(nll, objects) + mean(nll, background))
    acc = mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), objects)
    return loss, {"cell_loss": loss, "cell_acc": acc}


def check_cell_loss(config, net: state_lib.Network) -> float:
    """caption_loss.cell_weight, or ValueError when the model or the data cannot give it."""
    weight = float(config.caption_loss.get("cell_weight", 0.0))
    if not weight:
        return 0.0
    if not getattr(net.cfg, "conv_cell_classes", 0):
        raise ValueError(
            f"caption_loss.cell_weight={weight} needs a conv image tower with a per-cell "
            "classifier (model.image_tower='conv', model.conv_cell_classes > 0)"
        )
    if not config.data.get("cell_labels", 0):
        raise ValueError(
            f"caption_loss.cell_weight={weight} needs per-cell labels in the data "
            "(data.source='shapes' with data.cell_labels > 0)"
        )
    side = net.cfg.vision.image_size // net.cfg.vision.patch_size
    if config.data.cell_labels != side:
        raise ValueError(
            f"data.cell_labels={config.data.cell_labels}: the tower has {side} x {side} cells"
        )
    return weight


def make_caption_train_step(config, net: state_lib.Network, tx, lr_schedule, mesh, shardings, rest):
    """The jitted `train_step(state, rest, batch) -> (state, metrics)`; state donated."""
    smoothing = float(config.caption_loss.label_smoothing)
    vocab = output_vocab(config)
    norm = dict(mean=tuple(config.model.image_mean), std=tuple(config.model.image_std))
    cell_weight = check_cell_loss(config, net)

    def loss_fn(params, rest, batch, key):
        del key  # the objective draws nothing
        model = net.merge(params, rest)
        pixels = pixel_values(batch["image"], **norm)
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        if not cell_weight:
            return caption_loss(model, pixels, ids, mask, vocab=vocab, label_smoothing=smoothing)
        tokens = model.image_encoder(pixels).last_hidden_state
        image = model.project_image(tokens)
        loss, metrics = caption_loss(
            model, None, ids, mask, vocab=vocab, label_smoothing=smoothing, image=image
        )
        aux, aux_metrics = cell_loss(model.image_encoder.cell_head(tokens), batch["cell_labels"])
        return loss + cell_weight * aux, {**metrics, **aux_metrics, "caption_loss": loss}

    grad_fn = step_lib.make_grad_fn(loss_fn, config.optim.accum_steps, with_aux=True)
    update = step_lib.make_update(config, tx, lr_schedule)

    def train_step(state: state_lib.TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, aux, grads = grad_fn(state.params, rest, batch, key)
        state, metrics = update(state, loss, grads)
        return state, {**metrics, **aux}

    return step_lib.jit_step(train_step, mesh, shardings, rest)
