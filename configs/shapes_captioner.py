"""A small GIT captioner of the shapes domain: 64 px scenes -> their captions, in the frozen
MiniLM's WordPiece vocabulary (the text-to-image stages' tokenizer).

    nice -n 10 python train.py --config=configs/shapes_captioner.py --workdir=runs/shapes_captioner
    python train.py --config=configs/shapes_captioner.py:runlocal --workdir=/tmp/captioner_local
    python train.py --config=configs/shapes_captioner.py:steps=3000,batch=64 --workdir=...  # longer

The image tower is a ViT (64 px, 8 px patches: 64 patches + the class token, width 96, 4
layers); the decoder 3 BERT layers of width 64 over [image tokens | text tokens]. The
vocabulary (30,522 tokens) makes the word embeddings and the LM head (its own matrix: GIT
does not tie them) most of the 5 M parameters, hence the narrow decoder: the export stores
float16 and stays under 12 MB.

Trained on the shapes `train` split (the held-out colour-shape pairs and layouts never
shown) with the grammar's rich captions: several wordings per kind of scene (framings,
colour before or after the noun, sizes and the background now and then). The run ends by
writing WORKDIR/captioner/ (`training.caption_trainer`), which
`pipelines.captioning.load_captioner` and transformers' `GitForCausalLM` read; shipped in
checkpoints/shapes/captioner/.
"""

import ml_collections

from imagen_jax import training
from imagen_jax.config_utils import parse_arg
from imagen_jax.shapes import SHAPES
from imagen_jax.training.config import caption_loss_config


def get_config(arg=None):
    arg = parse_arg(
        arg, runlocal=False, res=64, batch=32, steps=1600, lr=1e-3, tower="conv", cell_weight=1.0
    )
    if arg.tower not in ("conv", "vit"):
        raise ValueError(f"tower={arg.tower!r}; expected 'conv' or 'vit'")
    conv = arg.tower == "conv"
    config = ml_collections.ConfigDict()
    config.model = training.model_config(
        family="git", variant="shapes_conv" if conv else "shapes", resolution=arg.res
    )
    cell_weight = arg.cell_weight if conv else 0.0
    if cell_weight:  # the tower's per-cell shape classifier: background + the six shapes
        config.model.conv_cell_classes = 1 + len(SHAPES)
    config.caption_loss = caption_loss_config(
        max_length=24,  # the longest of 3,000 training captions took 21 tokens with [CLS], [SEP]
        vocab="shapes",  # the softmax over the grammar's tokens only (caption_step.py)
        label_smoothing=0.0,
        sample_max_length=24,
        cell_weight=cell_weight,  # the per-cell shape loss (caption_step.cell_loss)
    )
    config.data = training.data_config(
        source="shapes",
        split="train",
        size=10_000_000,
        resolution=arg.res,
        batch_size=arg.batch,
        cell_labels=arg.res // 8 if cell_weight else 0,  # the conv tower's 8 px cells
    )
    config.optim = training.optim_config(
        lr=arg.lr, warmup_steps=200, decay="cosine", end_lr_factor=0.05, weight_decay=0.01
    )
    config.train = training.train_config(
        steps=arg.steps,
        log_every=25,
        checkpoint_every=100,
        keep_checkpoints=2,
        sample_every=250,  # greedy captions of held-out scenes, EMA weights
        num_samples=8,
        ema_decay=0.999,
    )
    config.mesh = training.default_mesh()
    if arg.runlocal:
        runlocal(config, arg.tower)
    return config


def runlocal(config, tower="vit"):
    """A tiny GIT (width 32, one layer a tower) on 16 px synthetic scenes, 20 steps; with
    tower=conv two conv stages (4 x 4 cells) on 16 px shapes scenes, with the cell loss."""
    if tower == "conv":
        config.model = training.model_config(
            family="git", variant="runlocal_conv", resolution=16, conv_cell_classes=1 + len(SHAPES)
        )
        config.data = training.data_config(
            source="shapes", size=64, resolution=16, batch_size=8, cell_labels=4
        )
    else:
        config.model = training.model_config(family="git", variant="runlocal", resolution=16)
        config.data = training.data_config(source="synthetic", size=64, resolution=16, batch_size=8)
    config.caption_loss.max_length = 12
    config.caption_loss.sample_max_length = 12
    config.optim = training.optim_config(lr=3e-3, warmup_steps=2, decay="constant")
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.sample_every = 10
    config.train.num_samples = 2
    config.train.ema_decay = 0.99
    config.train.progress = False
    return config
