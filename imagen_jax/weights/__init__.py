"""Loaders of public checkpoints (Hugging Face / diffusers layout, safetensors) into NNX state."""

from imagen_jax.weights.hf import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    KeyMap,
    Source,
    TensorInfo,
    checkpoint_tensors,
    load_into,
    read_config,
    read_safetensors_header,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "CheckpointError",
    "KeyMap",
    "Source",
    "TensorInfo",
    "checkpoint_tensors",
    "load_into",
    "read_config",
    "read_safetensors_header",
]
