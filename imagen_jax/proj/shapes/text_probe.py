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

    python -m imagen_jax.proj.shapes.text_probe                 # all-MiniLM-L6-v2, 3000 prompts
    python -m imagen_jax.proj.shapes.text_probe --prompts=600 --json=runs/text_probe.json
    python -m imagen_jax.proj.shapes.text_probe --task=color_attr   # the binding question
"""

from __future__ import annotations

import functools
import json

import numpy as np
from absl import app, flags

from imagen_jax.shapes import grammar, splits, tasks
from imagen_jax.shapes import wordings as wordings_lib
from imagen_jax.shapes.spec import COLORS, PromptSpec
from imagen_jax.text.config import encode_captions, make_text_encoder, text_config

FIRST_SIDE = ("left of", "above")  # relations whose subject is the left / upper object
QUESTIONS = ("subject", "relation", "side")


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression weights of targets y [N] or [N, K] on the rows of x [N, D]."""
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)


def linear_probe(features: np.ndarray, labels: np.ndarray, *, train_fraction=0.7, ridge=1e-2):
    """Held-out accuracy of a ridge classifier of boolean `labels` [N] from `features`
    [N, D] (the first `train_fraction` of the rows fit it), and the class-mean separation
    (|mean(True) - mean(False)| / RMS distance of the rows to their mean)."""
    labels = np.asarray(labels, bool)
    x = _with_bias(features)
    fit = np.arange(len(x)) < int(train_fraction * len(x))
    w = _ridge(x[fit], np.where(labels, 1.0, -1.0)[fit], ridge)
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


def task_prompts(
    task: str, n: int, seed: int = 0, split: str = "train", wordings: str = "grammar"
) -> list[tuple[PromptSpec, str]]:
    """n prompt specs of a task of the domain with a caption each, in a wording set
    (`imagen_jax.shapes.wordings`: grammar | train | heldout)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        spec = tasks.sample_prompt_spec(rng, task, split)
        text = grammar.caption(spec, rng) if wordings == "grammar" else None
        out.append((spec, text or wordings_lib.caption(spec, rng, wordings)))
    return out


def position_prompts(n: int, seed: int = 0, split: str = "train") -> list[tuple[PromptSpec, str]]:
    """n position specs of the domain (single objects on each side) with a caption each."""
    return task_prompts("position", n, seed, split)


def _word_id(encoder, word: str) -> int:
    row = np.asarray(encoder.tokenizer([word])[0])[0]
    inner = [t for t in row[1:] if t != encoder.tokenizer.pad_id][:-1]  # no [CLS] / [SEP]
    if len(inner) != 1:
        raise ValueError(f"the word {word!r} is {len(inner)} tokens; the probe needs one")
    return inner[0]


def _encoder(text_cfg):
    if text_cfg is None:
        text_cfg = text_config(kind="minilm", path="", max_length=32)
    return make_text_encoder(text_cfg)


def _noun_tokens(encoder, pairs) -> tuple[np.ndarray, dict[str, list[bool]]]:
    """(noun tokens [N, D], {question: answers [N]}) of the two nouns of position prompts
    (prompts whose nouns are not found once each are passed over)."""
    captions = [c for _, c in pairs]
    emb = encode_captions(encoder, captions)["text"]
    ids = np.asarray(encoder.tokenizer(captions)[0])
    noun_id = functools.partial(_word_id, encoder)

    features, answers = [], {q: [] for q in QUESTIONS}
    for row, (spec, _) in enumerate(pairs):
        a, b = spec.objects
        where = _noun_positions(ids[row], (noun_id(a.shape), noun_id(b.shape)))
        if where is None:
            continue
        first = spec.relation in FIRST_SIDE
        for index, subject in zip(where, (True, False), strict=True):
            features.append(np.asarray(emb[row, index], np.float64))
            answers["subject"].append(subject)
            answers["relation"].append(first)
            answers["side"].append(subject == first)
    return np.stack(features), answers


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


def _shape_tokens(encoder, pairs):
    """(tokens [N, D], colour index [N], held-out pair [N]) of the shape nouns of `pairs`
    (nouns the caption names once)."""
    captions = [c for _, c in pairs]
    emb = encode_captions(encoder, captions)["text"]
    ids = np.asarray(encoder.tokenizer(captions)[0])
    names = list(COLORS)
    features, colors, heldout = [], [], []
    for row, (spec, _) in enumerate(pairs):
        for obj in spec.objects:
            where = np.flatnonzero(ids[row] == _word_id(encoder, obj.shape))
            if len(where) == 1:
                features.append(np.asarray(emb[row, where[0]], np.float64))
                colors.append(names.index(obj.color))
                heldout.append((obj.color, obj.shape) in splits.HELDOUT_PAIRS)
    return np.stack(features), np.asarray(colors), np.asarray(heldout, bool)


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
    w = _ridge(_with_bias(x - mean), onehot, ridge)
    guess = (_with_bias(xt - mean) @ w).argmax(1)
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
    w = _ridge(_with_bias(x[fit]), np.where(y[fit], 1.0, -1.0), ridge)
    out["side"] = dict(
        train_wordings=float(np.mean((_with_bias(x[~fit]) @ w > 0) == y[~fit])),
        heldout_wordings=float(np.mean((_with_bias(xt) @ w > 0) == yt)),
        tokens=int(len(xt)),
    )
    x, y, _ = _shape_tokens(encoder, task_prompts("color_attr", prompts, seed, wordings="train"))
    xt, yt, _ = _shape_tokens(
        encoder, task_prompts("color_attr", prompts // 2, seed + 1, wordings="heldout")
    )
    x, y, fit = _shuffled_fit_rows(x, y, seed)
    onehot = -np.ones((int(fit.sum()), len(COLORS)))
    onehot[np.arange(int(fit.sum())), y[fit]] = 1.0
    w = _ridge(_with_bias(x[fit]), onehot, ridge)
    out["binding"] = dict(
        train_wordings=float(np.mean((_with_bias(x[~fit]) @ w).argmax(1) == y[~fit])),
        heldout_wordings=float(np.mean((_with_bias(xt) @ w).argmax(1) == yt)),
        tokens=int(len(xt)),
    )
    return out


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program, not on import)."""
    flags.DEFINE_integer("prompts", 3000, "Prompts to encode.")
    flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
    flags.DEFINE_string("json", "", "Also write the result to this file.")
    flags.DEFINE_enum("task", "position", ["position", "color_attr", "wordings"], "What to probe.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if args.task == "wordings":
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
