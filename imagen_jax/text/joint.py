"""Several frozen encoders read as one, as the public pipelines that condition on more than
one text model combine them.

    encoder = sdxl_text_encoder("models/sdxl")      # text_encoder + text_encoder_2
    emb, mask, pooled = encoder.encode(prompts)      # [B, 77, D1 + D2], [B, 77], [B, P2]
    encoder = sd3_text_encoder("models/sd3", max_sequence_length=77)  # + text_encoder_3

SDXL: both CLIPs' penultimate hidden states (no final norm) concatenated on the feature
axis; the pooled text is the second's projected pooled output. SD 3 (`pooled="concat"`,
`sequence=T5`, `width`): the CLIPs' states concatenated, zero-padded to the T5's width,
then the T5's tokens appended on the sequence axis (zeros without a T5); the pooled text
is both CLIPs' pooled outputs concatenated.

`pooled_conditions` tells the trainer that the network is conditioned on the pooled text
too (`text.config.encode_captions` puts it in the batch as "text_pooled").
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax.numpy as jnp

from imagen_jax.text.encoder import TextEmbeddings, TextEncoder, load_text_encoder

POOLED = ("last", "concat")


class JointTextEncoder:
    """`features` encoders (the same token length) concatenated on the feature axis, and
    optionally a `sequence` encoder appended on the token axis (see the module docstring).

    Args:
      features: encoders whose tokens are concatenated feature-wise, all of one length.
      pooled: "last" (the last feature encoder's pooled output) | "concat" (all of theirs).
      sequence: an encoder whose tokens follow on the sequence axis; its width is `width`.
      width: the joint width the feature tokens are zero-padded to (with `sequence`, or
        where the sequence part is left out: `sequence_length` zero tokens of that width).
      sequence_length: the zero tokens standing for a missing `sequence` encoder.
    """

    pooled_conditions = True

    def __init__(
        self,
        features: Sequence[TextEncoder],
        *,
        pooled: str = "last",
        sequence: TextEncoder | None = None,
        width: int | None = None,
        sequence_length: int = 0,
    ):
        if pooled not in POOLED:
            raise ValueError(f"pooled={pooled!r}; expected one of {POOLED}")
        if not features:
            raise ValueError("a JointTextEncoder needs at least one feature encoder")
        self.features = list(features)
        self.pooled = pooled
        self.sequence = sequence
        self.width = width
        self.sequence_length = sequence_length

    @property
    def max_length(self) -> int:
        """Tokens of an encoding: the feature encoders' (and the sequence part's)."""
        tail = self.sequence_length if self.width is not None else 0
        return self.features[0].max_length + tail

    @property
    def encoders(self) -> list[TextEncoder]:
        return [*self.features, *([self.sequence] if self.sequence is not None else [])]

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """prompts -> tokens [B, L, D], mask [B, L] bool, pooled [B, P]."""
        outs = [e.encode(prompts) for e in self.features]
        emb = jnp.concatenate([o.embeddings for o in outs], axis=-1)
        mask = outs[0].mask
        if self.pooled == "last":
            pooled = outs[-1].pooled
        else:
            pooled = jnp.concatenate([o.pooled for o in outs], axis=-1)
        if self.width is None:
            return TextEmbeddings(emb, mask, pooled)
        emb = jnp.pad(emb, ((0, 0), (0, 0), (0, self.width - emb.shape[-1])))
        if self.sequence is None:
            tail = jnp.zeros((len(prompts), self.sequence_length, self.width), emb.dtype)
            tail_mask = jnp.zeros((len(prompts), self.sequence_length), bool)
        else:
            out = self.sequence.encode(prompts)
            tail, tail_mask = out.embeddings.astype(emb.dtype), out.mask
        return TextEmbeddings(
            jnp.concatenate([emb, tail], axis=1), jnp.concatenate([mask, tail_mask], 1), pooled
        )

    __call__ = encode

    def fingerprint(self) -> dict:
        return dict(
            kind="joint",
            pooled_conditions=self.pooled_conditions,
            pooled=self.pooled,
            width=self.width,
            sequence_length=self.sequence_length,
            parts=[e.fingerprint() for e in self.encoders],
        )


def penultimate_clips(path, *, dtype, batch_bucket: int) -> list[TextEncoder]:
    """A pipeline's text_encoder and text_encoder_2 as SDXL and SD 3 read them: the
    penultimate hidden states, no mask into the model."""
    return [
        load_text_encoder(
            os.path.join(path, name),
            "clip",
            dtype=dtype,
            batch_bucket=batch_bucket,
            hidden_layer=-2,
            model_mask=False,
        )
        for name in ("text_encoder", "text_encoder_2")
    ]


def sdxl_text_encoder(
    path: str | os.PathLike, *, dtype=jnp.float32, batch_bucket: int = 8
) -> JointTextEncoder:
    """The text encoders of the SDXL pipeline directory `path` (text_encoder, text_encoder_2
    with their tokenizers), as StableDiffusionXLPipeline encodes prompts: 77 tokens, no mask
    into the model, "" encoded like any prompt."""
    encoders = penultimate_clips(path, dtype=dtype, batch_bucket=batch_bucket)
    return JointTextEncoder(encoders, pooled="last")


def sd3_text_encoder(
    path: str | os.PathLike,
    *,
    max_sequence_length: int = 256,
    dtype=jnp.float32,
    batch_bucket: int = 8,
) -> JointTextEncoder:
    """The text encoders of the SD 3 pipeline directory `path` as StableDiffusion3Pipeline
    encodes prompts: both CLIPs' penultimate states (77 tokens, no mask into the model),
    zero-padded to the transformer's joint_attention_dim, then `max_sequence_length` T5
    tokens (text_encoder_3, no mask into the model; zeros where the pipeline has none); the
    pooled text is both CLIPs' projections."""
    path = os.fspath(path)
    clips = penultimate_clips(path, dtype=dtype, batch_bucket=batch_bucket)
    t5 = None
    if os.path.isdir(os.path.join(path, "text_encoder_3")):
        t5 = load_text_encoder(
            os.path.join(path, "text_encoder_3"),
            "t5",
            dtype=dtype,
            batch_bucket=batch_bucket,
            max_length=max_sequence_length,
            model_mask=False,
            pooling="none",
        )
    with open(os.path.join(path, "transformer", "config.json")) as f:
        width = int(json.load(f)["joint_attention_dim"])
    return JointTextEncoder(
        clips, pooled="concat", sequence=t5, width=width, sequence_length=max_sequence_length
    )
