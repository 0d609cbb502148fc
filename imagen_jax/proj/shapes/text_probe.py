"""What the frozen text tokens of a position prompt say about the layout, read linearly.

For "A <relation> B" prompts of the shapes domain, each object's noun token (the encoder's
output there) is asked three questions by a ridge classifier fitted on 70% of the prompts and
scored on the rest:

* subject:  is this object the sentence's first (A)?
* relation: does the relation point to the start of its axis ("left of", "above")?
* side:     is this object the left (upper) one of the two? This is the exclusive-or of
            the two above, and it is what a cross-attention key must carry for a pixel on the
            left to find the object drawn there.

For "a C1 S1 and a C2 S2" prompts (colour attribution), `binding_probe` asks each shape
noun's token which colour its object has (a six-way ridge classifier fitted on training-split
prompts) and scores it on held-out-split prompts, apart for the held-out colour-shape pairs
(never in a training caption) and the trained ones: whether the token carries the binding
in a direction shared across pairs, so that a linear reader would generalise to a new pair.

Besides the accuracy, `separation` is the distance between the two classes' mean tokens
over the tokens' spread (root mean squared distance to their mean): how large the fact is
among everything else the token carries. A fact with high accuracy but a separation of a
few percent sits in directions of tiny variance, which a linear layer trained by gradient
descent is slow to pick out.

Across wordings (`wording_transfer`, `refiner_transfer`): readers fitted on captions in the
training wordings are scored on held-out wordings, linear ones on a noun's frozen token and
trained ones through the cascade's token refiner (`TextRefiner`) over all the caption's
tokens, the latter also by held-out sentence template: what a refiner trained with the
cascade could at best read from the frozen encoder in a wording it never saw.

    python -m imagen_jax.proj.shapes.text_probe                 # all-MiniLM-L6-v2, 3000 prompts
    python -m imagen_jax.proj.shapes.text_probe --prompts=600 --json=runs/text_probe.json
    python -m imagen_jax.proj.shapes.text_probe --task=color_attr   # the binding question
    python -m imagen_jax.proj.shapes.text_probe --task=wordings     # linear readers, wordings
    python -m imagen_jax.proj.shapes.text_probe --task=refiner      # trained token refiners
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from imagen_jax.models.unet_layers import TextRefiner
from imagen_jax.shapes import grammar, splits, tasks
from imagen_jax.shapes import wordings as wordings_lib
from imagen_jax.shapes.spec import COLORS, PromptSpec
from imagen_jax.text.config import encode_captions, make_text_encoder, text_config

FIRST_SIDE = ("left of", "above")  # relations whose subject is the left / upper object
QUESTIONS = ("subject", "relation", "side")


def with_bias(x: np.ndarray) -> np.ndarray:
    """x [N, D] with a column of ones appended, in float64."""
    return np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression weights of targets y [N] or [N, K] on the rows of x [N, D]."""
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)


def linear_probe(features: np.ndarray, labels: np.ndarray, *, train_fraction=0.7, ridge=1e-2):
    """Held-out accuracy of a ridge classifier of boolean `labels` [N] from `features`
    [N, D] (the first `train_fraction` of the rows fit it), and the class-mean separation
    (|mean(True) - mean(False)| / RMS distance of the rows to their mean)."""
    labels = np.asarray(labels, bool)
    x = with_bias(features)
    fit = np.arange(len(x)) < int(train_fraction * len(x))
    w = ridge_fit(x[fit], np.where(labels, 1.0, -1.0)[fit], ridge)
    accuracy = float(np.mean((x[~fit] @ w > 0) == labels[~fit]))
    spread = np.sqrt(np.mean(np.sum((features - features.mean(0)) ** 2, axis=1)))
    gap = np.linalg.norm(features[labels].mean(0) - features[~labels].mean(0))
    return accuracy, float(gap / spread)


def _noun_positions(ids: np.ndarray, noun_ids: tuple[int, int]) -> tuple[int, int] | None:
    """Token indices of A's and B's nouns (A's first occurrence, B's last)."""
    a = np.flatnonzero(ids == noun_ids[0])
    b = np.flatnonzero(ids == noun_ids[1])
    if len(a) == 0 or len(b) == 0 or a[0] == b[-1]:
        return None
    return int(a[0]), int(b[-1])


def task_captions(
    task: str, n: int, seed: int = 0, split: str = "train", wordings: str = "grammar"
) -> list[tuple[PromptSpec, str, str]]:
    """n prompt specs of a task of the domain with a caption each, in a wording set
    (`imagen_jax.shapes.wordings`: grammar | train | heldout), and the caption's sentence
    template ("grammar" for the grammar's)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = tasks.sample_prompt_spec(rng, task, split)
        text = grammar.caption(spec, rng) if wordings == "grammar" else None
        used = ["grammar"]
        if not text:
            text, used = wordings_lib.compose(spec, rng, wordings)
        out.append((spec, text, used[0]))
    return out


def task_prompts(
    task: str, n: int, seed: int = 0, split: str = "train", wordings: str = "grammar"
) -> list[tuple[PromptSpec, str]]:
    """`task_captions` without the templates: (spec, caption) pairs."""
    return [(spec, text) for spec, text, _ in task_captions(task, n, seed, split, wordings)]


def position_prompts(n: int, seed: int = 0, split: str = "train") -> list[tuple[PromptSpec, str]]:
    """n position specs of the domain (single objects on each side) with a caption each."""
    return task_prompts("position", n, seed, split)


def word_id(encoder, word: str) -> int:
    """The one token id of `word` (a ValueError where it is more than one token)."""
    row = np.asarray(encoder.tokenizer([word])[0])[0]
    inner = [t for t in row[1:] if t != encoder.tokenizer.pad_id][:-1]  # no [CLS] / [SEP]
    if len(inner) != 1:
        raise ValueError(f"the word {word!r} is {len(inner)} tokens; the probe needs one")
    return inner[0]


def _encoder(text_cfg):
    if text_cfg is None:
        text_cfg = text_config(kind="minilm", path="", max_length=32)
    return make_text_encoder(text_cfg)


def _noun_sites(encoder, pairs):
    """(text {"text" [N, L, D], "text_mask"}, sites [M, 2] of (row, token index), {question:
    answers [M]}) of the two nouns of position prompts (prompts whose nouns are not found
    once each are passed over)."""
    captions = [c for _, c in pairs]
    text = encode_captions(encoder, captions)
    ids = np.asarray(encoder.tokenizer(captions)[0])
    noun_id = functools.partial(word_id, encoder)
    sites, answers = [], {q: [] for q in QUESTIONS}
    for row, (spec, _) in enumerate(pairs):
        a, b = spec.objects
        where = _noun_positions(ids[row], (noun_id(a.shape), noun_id(b.shape)))
        if where is None:
            continue
        first = spec.relation in FIRST_SIDE
        for index, subject in zip(where, (True, False), strict=True):
            sites.append((row, index))
            answers["subject"].append(subject)
            answers["relation"].append(first)
            answers["side"].append(subject == first)
    return text, np.asarray(sites, np.int64).reshape(-1, 2), answers


def _at(text: dict, sites: np.ndarray) -> np.ndarray:
    """The tokens [M, D] at `sites` (row, index), in float64."""
    return np.asarray(text["text"][sites[:, 0], sites[:, 1]], np.float64)


def _noun_tokens(encoder, pairs) -> tuple[np.ndarray, dict[str, list[bool]]]:
    """(noun tokens [N, D], {question: answers [N]}) of the two nouns of position prompts."""
    text, sites, answers = _noun_sites(encoder, pairs)
    return _at(text, sites), answers


def text_probe(text_cfg=None, *, prompts: int = 3000, seed: int = 0) -> dict:
    """{question: {"accuracy", "separation"}} over the nouns of `prompts` position prompts,
    with the text encoder of `text_cfg` (default: the shapes cascade's all-MiniLM-L6-v2)."""
    features, answers = _noun_tokens(_encoder(text_cfg), position_prompts(prompts, seed))
    order = np.random.default_rng(seed).permutation(len(features))  # A and B rows apart
    out = {}
    for q in QUESTIONS:
        accuracy, separation = linear_probe(features[order], np.asarray(answers[q])[order])
        out[q] = dict(accuracy=accuracy, separation=separation)
    out["tokens"] = len(features)
    return out


def shape_sites(encoder, pairs):
    """(text, sites [M, 2], colour index [M], held-out pair [M]) of the shape nouns of
    `pairs` (nouns the caption names once)."""
    captions = [c for _, c in pairs]
    text = encode_captions(encoder, captions)
    ids = np.asarray(encoder.tokenizer(captions)[0])
    names = list(COLORS)
    sites, colors, heldout = [], [], []
    for row, (spec, _) in enumerate(pairs):
        for obj in spec.objects:
            where = np.flatnonzero(ids[row] == word_id(encoder, obj.shape))
            if len(where) == 1:
                sites.append((row, where[0]))
                colors.append(names.index(obj.color))
                heldout.append((obj.color, obj.shape) in splits.HELDOUT_PAIRS)
    sites = np.asarray(sites, np.int64).reshape(-1, 2)
    return text, sites, np.asarray(colors), np.asarray(heldout, bool)


def _shape_tokens(encoder, pairs):
    """(tokens [N, D], colour index [N], held-out pair [N]) of the shape nouns of `pairs`."""
    text, sites, colors, heldout = shape_sites(encoder, pairs)
    return _at(text, sites), colors, heldout


def binding_probe(text_cfg=None, *, prompts: int = 3000, seed: int = 0, ridge=1e-2) -> dict:
    """Which colour a colour-attribution prompt gives each shape, read linearly from the
    shape noun's token: a ridge classifier fitted on `prompts` training-split prompts,
    scored on half as many held-out-split prompts. {"heldout_pairs", "trained_pairs": the
    accuracy on the nouns of held-out / trained colour-shape pairs; "separation": the
    spread of the colour classes' mean tokens over the tokens' spread (fitting set);
    "tokens": the number scored}."""
    encoder = _encoder(text_cfg)
    x, y, _ = _shape_tokens(encoder, task_prompts("color_attr", prompts, seed, "train"))
    xt, yt, held = _shape_tokens(
        encoder, task_prompts("color_attr", prompts // 2, seed + 1, "heldout")
    )
    mean = x.mean(0)
    onehot = -np.ones((len(y), len(COLORS)))
    onehot[np.arange(len(y)), y] = 1.0
    w = ridge_fit(with_bias(x - mean), onehot, ridge)
    guess = (with_bias(xt - mean) @ w).argmax(1)
    spread = np.sqrt(np.mean(np.sum((x - mean) ** 2, axis=1)))
    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    separation = np.sqrt(np.mean(np.sum((means - means.mean(0)) ** 2, axis=1))) / spread
    return dict(
        heldout_pairs=float(np.mean(guess[held] == yt[held])),
        trained_pairs=float(np.mean(guess[~held] == yt[~held])),
        separation=float(separation),
        tokens=int(len(xt)),
    )


def _shuffled_fit_rows(x: np.ndarray, y: np.ndarray, seed: int, fraction: float = 0.7):
    """(x, y) in a seeded random order and the mask of the first `fraction` rows, which
    fit a reader; the rest score it."""
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order], np.arange(len(x)) < int(fraction * len(x))


def wording_transfer(text_cfg=None, *, prompts: int = 3000, seed: int = 0, ridge=1e-2) -> dict:
    """Whether what a layout and a binding need, read linearly from the frozen tokens of
    captions in the training wordings, reads the same from held-out wordings: ridge
    classifiers fitted on 70% of `prompts` training-wording prompts (training split), scored
    on the other 30% ("train_wordings") and on `prompts // 2` held-out-wording prompts of
    the same split ("heldout_wordings"). "side": is a position prompt's noun the left (upper)
    object; "binding": a colour-attribution noun's colour (six-way). Nouns said once only
    (synonyms such as "disc" are passed over)."""
    encoder = _encoder(text_cfg)
    out = {}
    x, answers = _noun_tokens(encoder, task_prompts("position", prompts, seed, wordings="train"))
    xt, answers_t = _noun_tokens(
        encoder, task_prompts("position", prompts // 2, seed + 1, wordings="heldout")
    )
    y, yt = np.asarray(answers["side"]), np.asarray(answers_t["side"])
    x, y, fit = _shuffled_fit_rows(x, y, seed)
    w = ridge_fit(with_bias(x[fit]), np.where(y[fit], 1.0, -1.0), ridge)
    out["side"] = dict(
        train_wordings=float(np.mean((with_bias(x[~fit]) @ w > 0) == y[~fit])),
        heldout_wordings=float(np.mean((with_bias(xt) @ w > 0) == yt)),
        tokens=int(len(xt)),
    )
    x, y, _ = _shape_tokens(encoder, task_prompts("color_attr", prompts, seed, wordings="train"))
    xt, yt, _ = _shape_tokens(
        encoder, task_prompts("color_attr", prompts // 2, seed + 1, wordings="heldout")
    )
    x, y, fit = _shuffled_fit_rows(x, y, seed)
    onehot = -np.ones((int(fit.sum()), len(COLORS)))
    onehot[np.arange(int(fit.sum())), y[fit]] = 1.0
    w = ridge_fit(with_bias(x[fit]), onehot, ridge)
    out["binding"] = dict(
        train_wordings=float(np.mean((with_bias(x[~fit]) @ w).argmax(1) == y[~fit])),
        heldout_wordings=float(np.mean((with_bias(xt) @ w).argmax(1) == yt)),
        tokens=int(len(xt)),
    )
    return out


class TokenReader(nnx.Module):
    """The cascade's token refiner (`TextRefiner`, `depth` layers; none at 0) over frozen
    tokens, then a linear classifier of the refined token at a site."""

    def __init__(self, dim: int, depth: int, classes: int, *, rngs: nnx.Rngs):
        self.refiner = TextRefiner(dim, depth, rngs=rngs) if depth else None
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, text, mask, index):  # text [B, L, D], mask [B, L], index [B]
        if self.refiner is not None:
            text = self.refiner(text, mask)
        return self.head(jnp.take_along_axis(text, index[:, None, None], axis=1)[:, 0])


def fit_token_reader(
    text: dict,
    sites: np.ndarray,
    labels: np.ndarray,
    classes: int,
    *,
    depth: int,
    steps: int = 800,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
):
    """A `TokenReader` fitted by AdamW (cross-entropy, `steps` batches of sites) to read
    `labels` at `sites` of `text` (`encode_captions`' output); returns predict(text, sites)
    -> classes [M]. The tokens past the longest caption are cut off first: they are outside
    every mask, so the refiner's attention never reads them, and the fit costs half."""
    text = _cut_padding(text)
    model = TokenReader(text["text"].shape[-1], depth, classes, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens, mask, index, label):
        def loss_fn(model):
            logits = model(tokens, mask, index)
            return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

        opt.update(model, nnx.grad(loss_fn)(model))

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pick = rng.integers(0, len(sites), batch)
        rows, index = sites[pick].T
        step(model, opt, text["text"][rows], text["text_mask"][rows], index, labels[pick])
    predict_batch = nnx.jit(lambda model, t, m, i: model(t, m, i).argmax(-1))

    def predict(text: dict, sites: np.ndarray) -> np.ndarray:
        text = _cut_padding(text)
        out = []
        for start in range(0, len(sites), 512):
            rows, index = sites[start : start + 512].T
            out.append(predict_batch(model, text["text"][rows], text["text_mask"][rows], index))
        return np.concatenate(out)

    return predict


def _cut_padding(text: dict) -> dict:
    """`text` without the token columns that no caption's mask reaches."""
    length = int(np.nonzero(text["text_mask"].any(0))[0].max()) + 1
    return {"text": text["text"][:, :length], "text_mask": text["text_mask"][:, :length]}


def _rows_before(sites: np.ndarray, fraction: float = 0.7) -> np.ndarray:
    """Mask of the sites of the first `fraction` of the prompts (the rows are in a random
    order already), so both nouns of a prompt fall on the same side of the split."""
    return sites[:, 0] < int(fraction * (sites[:, 0].max() + 1))


def _question_data(encoder, question: str, n: int, seed: int, wordings: str):
    """(text, sites, labels, the sentence template of each site) of n prompts for a question
    of `refiner_transfer`: "side" (position prompts) or "binding" (colour attribution)."""
    if question == "side":
        prompts = task_captions("position", n, seed, wordings=wordings)
        text, sites, answers = _noun_sites(encoder, [(p, c) for p, c, _ in prompts])
        labels = np.asarray(answers["side"], np.int32)
    else:
        prompts = task_captions("color_attr", n, seed, wordings=wordings)
        text, sites, labels, _ = shape_sites(encoder, [(p, c) for p, c, _ in prompts])
    templates = np.asarray([t for _, _, t in prompts])[sites[:, 0]]
    return text, sites, labels, templates


def refiner_transfer(
    text_cfg=None,
    *,
    prompts: int = 3000,
    seed: int = 0,
    depths=(0, 2),
    steps: int = 800,
    questions=("side", "binding"),
) -> dict:
    """`wording_transfer`'s two questions asked by trained readers: a token refiner of each
    of `depths` layers (`TextRefiner`, the one `configs/shapes_base.py:text_refiner=N` puts
    in the cascade's base) over all the frozen tokens of the caption, then a linear read of
    the noun's refined token, fitted with the labels (the most direct training signal a
    refiner could have) on 70% of the training-wording prompts, scored on the other 30% and
    on held-out-wording prompts. {question: {depth: {"train_wordings", "heldout_wordings",
    "by_template": {held-out sentence template: accuracy}}}}"""
    encoder = _encoder(text_cfg)
    data = {
        (question, wordings): _question_data(encoder, question, n, s, wordings)
        for question in questions
        for wordings, n, s in (("train", prompts, seed), ("heldout", prompts // 2, seed + 1))
    }
    out = {}
    for question in questions:
        classes = {"side": 2, "binding": len(COLORS)}[question]
        text, sites, labels, _ = data[question, "train"]
        fit = _rows_before(sites)
        held_text, held_sites, held_labels, held_templates = data[question, "heldout"]
        out[question] = {}
        for depth in depths:
            predict = fit_token_reader(
                text, sites[fit], labels[fit], classes, depth=depth, steps=steps, seed=seed
            )
            right = predict(held_text, held_sites) == held_labels
            out[question][depth] = dict(
                train_wordings=float(np.mean(predict(text, sites[~fit]) == labels[~fit])),
                heldout_wordings=float(np.mean(right)),
                by_template={
                    t: float(np.mean(right[held_templates == t]))
                    for t in sorted(set(held_templates))
                },
            )
    return out


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, not on import)."""
    flags.DEFINE_integer("prompts", 3000, "Prompts to encode.")
    flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
    flags.DEFINE_string("json", "", "Also write the result to this file.")
    flags.DEFINE_enum(
        "task", "position", ["position", "color_attr", "wordings", "refiner"], "What to probe."
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if args.task == "refiner":
        result = refiner_transfer(prompts=args.prompts, seed=args.seed)
        print("all-MiniLM-L6-v2, trained readers (token refiner of N layers) fitted on")
        print("training wordings, accuracy on training / held-out wordings, and by template")
        for q, by_depth in result.items():
            for depth, r in by_depth.items():
                templates = ", ".join(f"{t} {a:.2f}" for t, a in r["by_template"].items())
                print(
                    f"{q:<8} N={depth}  {r['train_wordings']:.3f} / {r['heldout_wordings']:.3f}"
                    f"  ({templates})"
                )
    elif args.task == "wordings":
        result = wording_transfer(prompts=args.prompts, seed=args.seed)
        print("all-MiniLM-L6-v2, classifiers fitted on training wordings, accuracy on")
        print("question   training wordings   held-out wordings   tokens")
        for q in ("side", "binding"):
            r = result[q]
            print(
                f"{q:<10} {r['train_wordings']:<19.3f} {r['heldout_wordings']:<19.3f} {r['tokens']}"
            )
    elif args.task == "color_attr":
        result = binding_probe(prompts=args.prompts, seed=args.seed)
        print(f"all-MiniLM-L6-v2, the colour of {result['tokens']} shape nouns of held-out")
        print("colour-attribution prompts, read by a classifier fitted on training prompts")
        print(
            f"held-out pairs {result['heldout_pairs']:.3f}, trained pairs "
            f"{result['trained_pairs']:.3f}, separation {result['separation']:.3f}"
        )
    else:
        result = text_probe(prompts=args.prompts, seed=args.seed)
        print(
            f"all-MiniLM-L6-v2, {result['tokens']} noun tokens of {args.prompts} position prompts"
        )
        print("question   held-out accuracy   separation")
        for q in QUESTIONS:
            print(f"{q:<10} {result[q]['accuracy']:<19.3f} {result[q]['separation']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
