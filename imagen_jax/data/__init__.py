"""Input pipelines: image-caption sources, per-stage preprocessing, grain batch iterators.

    source = ImageFolderSource("data/")  # or TarShardSource, TfdsSource, ShapesSource
    it = make_pipeline(source, batch_size=32, resolution=64, seed=0)
    batch = next(it)  # {"image": uint8 [32, 64, 64, 3], "caption": [32] str, "key": [32] str}

A source is anything with `__len__` and `__getitem__(i) -> {"image", "caption", "key"}`
(grain's random-access protocol); `pipeline.py` says what the pipeline guarantees
(sharding per process, determinism, resumable state, corrupt-record skipping).
"""

from imagen_jax.data.buckets import BucketPlan, parse_buckets
from imagen_jax.data.pipeline import (
    DataIterator,
    SkippedRecord,
    example_stream,
    make_pipeline,
    stack_examples,
)
from imagen_jax.data.preprocess import (
    CorruptRecordError,
    decode_image,
    downsample,
    preprocess_record,
    resize_and_crop,
)
from imagen_jax.data.shapes_source import ShapesSource
from imagen_jax.data.sources import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    TarShardSource,
    TfdsSource,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BucketPlan",
    "CorruptRecordError",
    "DataIterator",
    "ImageFolderSource",
    "ShapesSource",
    "SkippedRecord",
    "TarShardSource",
    "TfdsSource",
    "decode_image",
    "downsample",
    "example_stream",
    "make_pipeline",
    "parse_buckets",
    "preprocess_record",
    "resize_and_crop",
    "stack_examples",
]
