"""Captions from images with GIT (`imagen_jax.models.git`): greedy and beam search, each one
compiled `lax.while_loop` over a key/value cache.

    captioner = load_captioner("git-base-coco", batch_size=32, max_length=20, num_beams=3)
    captions = captioner(images)  # uint8 RGB [H, W, 3] each -> list of str

The decoding rules are those of transformers' `GenerationMixin.generate` (v5.23) for a
decoder-only model, kept exactly so that the same weights give the same token ids:

* Start: each row's prompt, by default the single bos token ([CLS] for GIT). Prompts are
  left-padded with a mask; positions count the prompt's tokens (`git.prompt_positions`).
* Greedy (`_sample` without sampling): the argmax token is appended; a row that produced
  an eos token (any of `eos_token_id`) is finished and gets `pad_token_id` from then on;
  decoding stops when every row is finished or the sequences reach `max_length` tokens
  (prompt included).
* Beam search (`_beam_search`): num_beams running beams per image; at each step the
  2 * num_beams (more with several eos tokens) best continuations over all beams by
  summed log-probabilities; those ending in eos, or reaching max_length, are hypotheses
  scored by sum / (generated length) ** length_penalty and kept among the num_beams best
  finished ones; the best other continuations run on. `early_stopping`: True stops an
  image once it has num_beams hypotheses; False stops it when the best running beam, at
  its current length, cannot beat the worst hypothesis; "never" the same but assuming the
  longest possible length when length_penalty > 0. The result is each image's best
  hypothesis; shorter ones are filled with `pad_token_id`, or with the first eos token
  when pad_token_id is 0 or unset (transformers' `pad_token_id or eos_token_id[0]`).
* Output length: as transformers crops, the longest result in the batch, which the
  `Generated.lengths` give; `crop` cuts to it.

Batches are padded to the compiled size (their padding rows count as finished from the
start, so they never keep the loop running) and sharded over the local devices on a "data"
mesh; the parameters are replicated. One program is compiled per (batch size, prompt
length, max_length, strategy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import parallel
from imagen_jax.images import ImageProcessor
from imagen_jax.models.git import GitForCausalLM, KVCache, load_git, read_git_config
from imagen_jax.text.tokenizer import Tokenizer

NEG = -1.0e9  # transformers' "impossible" score in beam search
GENERATION_CONFIG = "generation_config.json"
EARLY_STOPPING = (False, True, "never")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to decode: greedy when num_beams == 1, else beam search."""

    max_length: int = 20  # tokens, prompt included (transformers' max_length)
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: hypotheses score sum / length ** this
    early_stopping: bool | str = False  # beam search: False | True | "never"
    eos_token_id: tuple[int, ...] = (102,)
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in EARLY_STOPPING:
            raise ValueError(
                f"early_stopping must be one of {EARLY_STOPPING}, got {self.early_stopping!r}"
            )


class Generated(NamedTuple):
    """sequences [B, max_length] int32 (prompt first); lengths [B]: the tokens each row's
    result holds (prompt included); scores [B]: beam search's score of the result (greedy:
    zeros)."""

    sequences: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray

    def crop(self) -> np.ndarray:
        """The sequences cut to the longest result, as transformers' generate returns them."""
        return self.sequences[:, : int(self.lengths.max(initial=1))]


# ----------------------------------------------------------------------------------------------
# The decoding loops (traced inside one jit)
# ----------------------------------------------------------------------------------------------


def _greedy(model: GitForCausalLM, pixel_values, prompt_ids, prompt_mask, row_valid, d: Decoding):
    b, p = prompt_ids.shape
    logits, cache = model.prefill(pixel_values, prompt_ids, prompt_mask, max_length=d.max_length)
    sequences = jnp.pad(prompt_ids, ((0, 0), (0, d.max_length - p)))
    next_position = prompt_mask.astype(jnp.int32).sum(-1)  # [B]
    eos = jnp.asarray(d.eos_token_id or (-1,), jnp.int32)
    pad = d.pad_token_id if d.pad_token_id is not None else d.eos_token_id[0]

    def cond(state):
        cur_len, _, _, unfinished, _, _ = state
        return (cur_len < d.max_length) & unfinished.any()

    def body(state):
        cur_len, sequences, logits, unfinished, cache, position = state
        token = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        token = jnp.where(unfinished, token, pad)
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, token[:, None], cur_len, 1)
        unfinished = unfinished & ~jnp.isin(token, eos) & (cur_len + 1 < d.max_length)
        logits, cache = model.decode_step(token, position, cur_len, cache)
        return cur_len + 1, sequences, logits, unfinished, cache, position + 1

    state = (jnp.int32(p), sequences, logits, row_valid, cache, next_position)
    cur_len, sequences, *_ = jax.lax.while_loop(cond, body, state)
    lengths = jnp.full((b,), cur_len, jnp.int32)
    return sequences, lengths, jnp.zeros((b,), jnp.float32)


class _Beams(NamedTuple):
    cur_len: jax.Array  # scalar
    running: jax.Array  # [B, K, T] running sequences
    running_scores: jax.Array  # [B, K] summed log-probs
    sequences: jax.Array  # [B, K, T] hypotheses, best first
    scores: jax.Array  # [B, K] their length-penalized scores
    lengths: jax.Array  # [B, K] their generated lengths (0: none yet)
    finished: jax.Array  # [B, K] is_sent_finished
    improvable: jax.Array  # [B, 1] is_early_stop_heuristic_unsatisfied
    going: jax.Array  # scalar bool: the loop's condition
    logits: jax.Array  # [B * K, V] at the running beams' last token
    cache: KVCache
    position: jax.Array  # [B * K] the next token's position id


def _gather(x, index):  # x [B, M, ...], index [B, k] -> [B, k, ...]
    return jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)


def _beam_search(
    model: GitForCausalLM, pixel_values, prompt_ids, prompt_mask, row_valid, d: Decoding
):
    b, p = prompt_ids.shape
    k, t = d.num_beams, d.max_length
    n_eos = len(d.eos_token_id)
    keep = max(2, 1 + n_eos) * k  # beams_to_keep
    eos = jnp.asarray(d.eos_token_id or (-1,), jnp.int32)
    fill = (d.pad_token_id or d.eos_token_id[0]) if d.eos_token_id else -1  # as transformers
    # Python's n ** length_penalty in float64 for every length, then float32, as transformers
    # divides a float32 tensor by that Python float.
    penalty = jnp.asarray([float(max(n, 1)) ** d.length_penalty for n in range(t + 1)], jnp.float32)
    top_beams = jnp.arange(keep) < k  # top_num_beam_mask

    logits, cache = model.prefill(pixel_values, prompt_ids, prompt_mask, max_length=t, beams=k)
    running = jnp.full((b, k, t), fill, jnp.int32)
    running = running.at[:, :, :p].set(prompt_ids[:, None].astype(jnp.int32))
    position = jnp.repeat(prompt_mask.astype(jnp.int32).sum(-1), k)  # [B * K]
    state = _Beams(
        cur_len=jnp.int32(p),
        running=running,
        running_scores=jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None].repeat(b, 0),
        sequences=running,
        scores=jnp.full((b, k), NEG, jnp.float32),
        lengths=jnp.zeros((b, k), jnp.int32),
        finished=jnp.broadcast_to(~row_valid[:, None], (b, k)),  # padding rows: done
        improvable=row_valid[:, None],
        going=jnp.bool_(True),
        logits=logits,
        cache=cache,
        position=position,
    )

    def body(s: _Beams) -> _Beams:
        cur_len = s.cur_len
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(b, k, vocab) + s.running_scores[:, :, None]
        top_log_probs, top_index = jax.lax.top_k(log_probs.reshape(b, k * vocab), keep)
        parent, token = top_index // vocab, top_index % vocab  # [B, keep]
        candidates = _gather(s.running, parent)  # [B, keep, T]
        candidates = jax.lax.dynamic_update_slice_in_dim(
            candidates, token[:, :, None].astype(jnp.int32), cur_len, 2
        )
        hits = jnp.isin(token, eos) | (cur_len + 1 >= t)  # [B, keep]

        # the best unfinished continuations run on
        running_log_probs = top_log_probs + hits.astype(jnp.float32) * NEG
        _, next_index = jax.lax.top_k(running_log_probs, k)
        running = _gather(candidates, next_index)
        running_scores = _gather(running_log_probs, next_index)
        next_parent = _gather(parent, next_index)  # [B, K]

        # finished continuations among the top num_beams join the hypotheses
        just_finished = hits & top_beams[None]
        scores = top_log_probs / penalty[cur_len + 1 - p]
        full = jnp.all(s.finished, axis=-1, keepdims=True) & (d.early_stopping is True)
        scores = scores + full.astype(jnp.float32) * NEG
        scores = scores + (~s.improvable).astype(jnp.float32) * NEG
        scores = scores + (~just_finished).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([s.scores, scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        sequences = _gather(jnp.concatenate([s.sequences, candidates], axis=1), best)
        new_lengths = jnp.full((b, keep), cur_len + 1 - p, jnp.int32)
        lengths = _gather(jnp.concatenate([s.lengths, new_lengths], axis=1), best)
        finished = _gather(jnp.concatenate([s.finished, just_finished], axis=1), best)
        scores = _gather(merged_scores, best)

        cur_len = cur_len + 1
        if d.early_stopping == "never" and d.length_penalty > 0.0:
            best_length = t - p
        else:
            best_length = cur_len - p
        best_running = running_scores[:, :1] / penalty[best_length]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable & jnp.any(best_running > worst_finished, -1, keepdims=True)
        going = (
            jnp.any(improvable)
            & ~(jnp.all(finished) & (d.early_stopping is True))
            & ~jnp.all(hits | ~row_valid[:, None])
        )

        rows = (next_parent + jnp.arange(b)[:, None] * k).reshape(-1)  # [B * K]
        logits, cache = model.decode_step(
            running[:, :, cur_len - 1].reshape(-1), s.position, cur_len - 1, s.cache.reorder(rows)
        )
        return _Beams(
            cur_len, running, running_scores, sequences, scores, lengths, finished,
            improvable, going, logits, cache, s.position + 1,
        )  # fmt: skip

    s = jax.lax.while_loop(lambda s: s.going & (s.cur_len < t), body, state)
    return s.sequences[:, 0], p + s.lengths[:, 0], s.scores[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "decoding"))
def _generate(graphdef, state, pixel_values, prompt_ids, prompt_mask, row_valid, *, decoding):
    model = nnx.merge(graphdef, state)
    search = _greedy if decoding.num_beams == 1 else _beam_search
    return search(model, pixel_values, prompt_ids, prompt_mask, row_valid, decoding)


def generate(
    model: GitForCausalLM,
    pixel_values: np.ndarray | jax.Array,
    decoding: Decoding,
    *,
    prompt_ids: np.ndarray | None = None,
    prompt_mask: np.ndarray | None = None,
    bos_token_id: int | None = None,
) -> Generated:
    """Token ids for preprocessed images [B, S, S, 3], on the default device (no padding of
    the batch; `Captioner` pads and shards). prompt_ids [B, P] (left-padded, with
    prompt_mask) default to the single bos token (default: the model's bos_token_id)."""
    pixel_values = jnp.asarray(pixel_values)
    b = pixel_values.shape[0]
    prompt_ids, prompt_mask = _prompts(model, b, prompt_ids, prompt_mask, bos_token_id)
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        pixel_values,
        jnp.asarray(prompt_ids),
        jnp.asarray(prompt_mask),
        jnp.ones((b,), bool),
        decoding=decoding,
    )
    return Generated(*(np.asarray(x) for x in out))


def _prompts(model, b, prompt_ids, prompt_mask, bos_token_id):
    if prompt_ids is None:
        bos = model.config.bos_token_id if bos_token_id is None else bos_token_id
        if bos is None:
            raise ValueError("no prompt and no bos_token_id to start from")
        prompt_ids = np.full((b, 1), bos, np.int32)
    prompt_ids = np.asarray(prompt_ids, np.int32)
    if prompt_mask is None:
        prompt_mask = np.ones_like(prompt_ids)
    if prompt_ids.shape != (b, prompt_ids.shape[1]) or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {np.shape(prompt_mask)} must be "
            f"[{b}, P]"
        )
    return prompt_ids, np.asarray(prompt_mask, np.int32)


# ----------------------------------------------------------------------------------------------
# Captioner: images in, strings out
# ----------------------------------------------------------------------------------------------


class Captioner:
    """A GIT model with its preprocessing and tokenizer, run in batches of a fixed size
    sharded over the local devices (a 1-D "data" mesh; a short batch is padded)."""

    def __init__(
        self,
        model: GitForCausalLM,
        processor: ImageProcessor,
        tokenizer: Tokenizer,
        decoding: Decoding,
        *,
        bos_token_id: int | None = None,
        batch_size: int = 32,
        devices: Sequence[jax.Device] | None = None,
    ):
        size = model.config.vision.image_size
        if processor.crop is not None and tuple(processor.crop) != (size, size):
            raise ValueError(
                f"the preprocessing crops to {processor.crop}, the image tower takes {size}x{size}"
            )
        if decoding.max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {decoding.max_length} exceeds the model's "
                f"max_position_embeddings {model.config.max_position_embeddings}"
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.bos_token_id = model.config.bos_token_id if bos_token_id is None else bos_token_id
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = parallel.make_mesh([("data", -1)], devices=devices)
        self.batch_size = -(-max(int(batch_size), 1) // len(devices)) * len(devices)
        self.graphdef, state = nnx.split(model)
        self.config = model.config
        self.state = jax.device_put(state, parallel.replicated(self.mesh))
        self._batch_sharding = parallel.batch_sharding(self.mesh)

    def generate(self, pixel_values: np.ndarray) -> Generated:
        """Preprocessed pixel_values [n <= batch_size, S, S, 3] -> Generated of n rows."""
        x = np.asarray(pixel_values, np.float32)
        n = len(x)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch of {n} images; this captioner takes 1..{self.batch_size}")
        pad = self.batch_size - n
        ids = np.full((self.batch_size, 1), self.bos_token_id, np.int32)
        arrays = (
            np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]),
            ids,
            np.ones_like(ids),
            np.arange(self.batch_size) < n,
        )
        put = [jax.device_put(a, self._batch_sharding) for a in arrays]
        with jax.default_matmul_precision("highest"):
            out = _generate(self.graphdef, self.state, *put, decoding=self.decoding)
        return Generated(*(np.asarray(o)[:n] for o in out))

    def decode(self, generated: Generated) -> list[str]:
        """Token ids -> text, special tokens skipped (transformers' batch_decode)."""
        return self.tokenizer.decode(
            [s[:length] for s, length in zip(generated.sequences, generated.lengths, strict=True)]
        )

    def __call__(self, images: Iterable[np.ndarray]) -> list[str]:
        """uint8 RGB images [H, W, 3] (any sizes; read batch by batch) -> captions."""
        captions, batch = [], []
        for i, image in enumerate(images):
            try:
                batch.append(self.processor(image))
            except ValueError as e:
                raise ValueError(f"image {i}: {e}") from None
            if len(batch) == self.batch_size:
                captions += self.decode(self.generate(np.stack(batch)))
                batch = []
        if batch:
            captions += self.decode(self.generate(np.stack(batch)))
        return captions


DEFAULT_MAX_LENGTH = 20  # transformers' generate, when generation_config.json names none


def _generation_settings(path: str) -> dict:
    """bos / eos / pad token ids and max_length of generation_config.json, which
    transformers' generate prefers to config.json's."""
    file = os.path.join(path, GENERATION_CONFIG)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        hf = json.load(f)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "max_length")
    return {k: hf[k] for k in keys if k in hf}


def read_decoding(
    path: str | os.PathLike,
    *,
    max_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> tuple[Decoding, int | None]:
    """(Decoding, bos_token_id) of a GIT directory's special tokens (config.json, overridden
    by generation_config.json as in transformers) and the given settings; reads no weights.
    max_length None: generation_config.json's, else transformers' default 20."""
    path = os.fspath(path)
    config = read_git_config(path)  # refuses another model's directory before reading more
    tokens = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        **_generation_settings(path),
    }
    eos = tokens["eos_token_id"]
    eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    if max_length is None:
        max_length = int(tokens.get("max_length", DEFAULT_MAX_LENGTH))
    decoding = Decoding(
        max_length=max_length,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=tokens["pad_token_id"],
    )
    return decoding, tokens["bos_token_id"]


def load_captioner(
    path: str | os.PathLike,
    *,
    max_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    batch_size: int = 32,
    dtype=jnp.float32,
    devices: Sequence[jax.Device] | None = None,
) -> Captioner:
    """A Captioner from a GIT directory: config.json, model.safetensors (or sharded),
    preprocessor_config.json, tokenizer.json (the BERT WordPiece tokenizer GIT uses) and,
    if present, generation_config.json for the special token ids and the default max_length
    (`read_decoding`)."""
    path = os.fspath(path)
    decoding, bos_token_id = read_decoding(
        path,
        max_length=max_length,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    tokenizer = Tokenizer.from_dir(path, decoding.max_length)
    processor = ImageProcessor.from_dir(path)
    return Captioner(
        load_git(path, dtype=dtype),
        processor,
        tokenizer,
        decoding,
        bos_token_id=bos_token_id,
        batch_size=batch_size,
        devices=devices,
    )
