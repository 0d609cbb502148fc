"""An image-text embedding model of the shapes domain: a small convolutional image tower
trained from scratch on 64 px scenes, the frozen all-MiniLM-L6-v2 (token embeddings,
mean-pooled) with a trained projection on the text side, the SigLIP sigmoid loss
(`loss=clip`: CLIP's softmax).

    python train.py --config=configs/shapes_embedding.py:hard_negatives --workdir=runs/emb
    python train.py --config=configs/shapes_embedding.py:runlocal --workdir=/tmp/embedding_local
    python train.py --config=configs/shapes_embedding.py:tower=vit,steps=6000 --workdir=...
    python train.py --config=configs/shapes_embedding.py:loss=clip,frozen_tower=image --workdir=...

The image tower (`tower`) is `frozen_text_towers.VARIANTS["shapes_conv"]` by default: a
3x3 stem and three stride-2 stages (32, 64, 128 channels, GroupNorm, GELU) whose 8x8 map is
flattened, so that positions survive, then projected to 128 dimensions. Besides RGB the
stem reads a colour-blind foreground channel (each pixel's distance from the image's median
colour: the silhouettes), so that a shape is one pattern in every colour, held-out
colour-shape pairs included. `tower=vit` takes
`VARIANTS["shapes"]`, a SigLIP-family ViT (8 px patches: 64 tokens, width 128, 4 layers,
attention-pooling head): trained from scratch here it learns colour long before shape
(after 1,000 steps of this recipe its embeddings told shapes apart at chance; see
docs/embeddings.md). The text side mean-pools MiniLM's 384-dim token embeddings through a
trained linear projection (`text_mlp`: an MLP, 384 hidden, which let "red star", a held-out
pair, fall far from red stars: a conjunction the MLP was free to learn, where a linear map
of the pooled tokens stays a sum of its words' parts). Trained on the shapes `train` split
(held-out colour-shape pairs and layouts never shown) with the `train` wording set's
captions. `hard_negatives` adds
each scene's counterfactual caption (its relation inverted, its two colours exchanged or
one shape replaced, whichever of those apply picked per scene: `data.counterfactuals`,
`data.counterfactuals_mixed`; never one naming a held-out pair or layout) as an extra
negative text in the loss: the
binding that contrastive models otherwise learn late or never, and shape, which without
shape negatives neither image tower had learnt after 500-1,000 steps (docs/embeddings.md).
`text_side=tower` trains a SigLIP (or CLIP) text tower from scratch instead of the frozen
MiniLM (with `tower=vit` only). Every `evals.every` steps: zero-shot colour and shape,
retrieval recall and the hard-negative accuracy on held-out and training scenes.

The run ends by writing WORKDIR/embedding/ (`training.contrastive_trainer`), which
`pipelines.embedding.load_embedder`, `retrieve.py` and `eval/retrieval.py` read.
"""

import ml_collections

from imagen_jax import training
from imagen_jax.config_utils import ConfigError, parse_arg
from imagen_jax.text.config import text_config
from imagen_jax.training.config import contrastive_config, embedding_evals_config

LOSSES = {"siglip": "sigmoid", "clip": "softmax"}
TOWERS = {"conv": "shapes_conv", "vit": "shapes"}  # frozen_text_towers.VARIANTS


def get_config(arg=None):
    arg = parse_arg(
        arg,
        runlocal=False,
        res=64,
        batch=128,
        steps=3000,
        lr=1e-3,
        loss="siglip",  # siglip | clip
        hard_negatives=False,
        text_side="frozen",  # frozen (MiniLM + projection) | tower (trained text tower)
        frozen_tower="",  # "" | image | text (LiT: that tower frozen)
        tower="conv",  # the image tower: conv (ConvTower) | vit (a SigLIP ViT)
        text_mlp=False,  # the frozen text side's projection: linear, or an MLP (384 hidden)
    )
    if arg.loss not in LOSSES:
        raise ConfigError(f"loss={arg.loss!r}; expected one of {sorted(LOSSES)}")
    loss = LOSSES[arg.loss]
    if arg.tower not in TOWERS:
        raise ConfigError(f"tower={arg.tower!r}; expected one of {sorted(TOWERS)}")
    config = ml_collections.ConfigDict()
    config.model = training.model_config(
        family="two_towers",
        variant=TOWERS[arg.tower],
        text_side=arg.text_side,
        resolution=arg.res,
        text_dim=384,  # all-MiniLM-L6-v2's width
        logit_bias=loss == "sigmoid",
        text_hidden=384 if arg.text_mlp else 0,
    )
    config.text = text_config(kind="minilm", path="", max_length=32)
    config.contrastive = contrastive_config(
        loss=loss, frozen_tower=arg.frozen_tower, hard_negatives=arg.hard_negatives, max_length=32
    )
    config.data = training.data_config(
        source="shapes",
        split="train",
        size=10_000_000,
        resolution=arg.res,
        batch_size=arg.batch,
        wordings="train",
        counterfactuals="relation,colors,shape" if arg.hard_negatives else "",
        counterfactuals_mixed=arg.hard_negatives,
    )
    config.optim = training.optim_config(
        lr=arg.lr, warmup_steps=200, decay="cosine", end_lr_factor=0.05, weight_decay=0.05
    )
    config.train = training.train_config(
        steps=arg.steps,
        log_every=25,
        checkpoint_every=200,
        keep_checkpoints=2,
        sample_every=0,  # no sample grid: evals.every runs the embedding evaluators
        ema_decay=0.999,
    )
    config.evals = embedding_evals_config(every=500)
    config.mesh = training.default_mesh()
    if arg.runlocal:
        runlocal(config)
    return config


def runlocal(config):
    """A tiny tower (width 32, one layer) on 16 px shapes scenes with the weight-free hash
    text encoder, 20 steps in seconds."""
    config.model.variant = "runlocal"
    config.model.text_dim = 32
    config.model.resolution = 16
    config.text = text_config(kind="hash", dim=32, max_length=32)
    config.data.resolution = 16
    config.data.batch_size = 8
    config.data.size = 4096
    config.optim = training.optim_config(lr=3e-3, warmup_steps=2, decay="constant")
    config.train.steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.ema_decay = 0.9
    config.train.progress = False
    config.evals = embedding_evals_config(every=0, size=12, batch_size=16)
    return config
