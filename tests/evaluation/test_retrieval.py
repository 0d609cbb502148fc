"""The embedding evaluators on hand-built embedders whose answers are known: a colour reader
(zero-shot colour right, shape at chance), a lookup that knows every pair (recall 1), one that
is off by one (recall@1 0), a bag of words (blind to exchanged colours), and the rank rules
(ties count against, same captions are no rivals)."""

import numpy as np
import pytest

from imagen_jax.evaluation import retrieval
from imagen_jax.shapes.spec import COLORS, SHAPES, ObjectSpec, PromptSpec
from imagen_jax.training.config import embedding_evals_config

RES = 32
WORDS = sorted({*COLORS, *SHAPES, "left", "right", "above", "below", "two", "three", "four"})


def one_hot(index, size):
    out = np.zeros(size, np.float32)
    out[index] = 1.0
    return out


class ColorReader:
    """Images: one-hot of the palette colour nearest the second most common pixel;
    texts: one-hot of the first colour word. Knows colours, nothing of shapes."""

    def embed_images(self, images):
        palette = np.asarray(list(COLORS.values()), np.float32)
        out = []
        for image in images:
            colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
            # The most common colour is the background, the next one the object's interior.
            pixel = colors[np.argsort(-counts)[1]].astype(np.float32)
            out.append(one_hot(np.argmin(((palette - pixel) ** 2).sum(-1)), 6))
        return np.stack(out)

    def embed_texts(self, texts):
        out = []
        for text in texts:
            found = [i for i, c in enumerate(COLORS) if c in text.split()]
            out.append(one_hot(found[0], 6) if found else np.full(6, 6**-0.5, np.float32))
        return np.stack(out)


class Lookup:
    """Item i's image embeds to one-hot i, a caption to the (normalised) sum of the one-hots
    of the items it captions (`shift`: of i + shift); anything else to zeros."""

    def __init__(self, images, captions, shift=0):
        self.images = [im.tobytes() for im in images]
        self.captions, self.shift = list(captions), shift

    def embed_images(self, images):
        n = len(self.images)
        return np.stack([one_hot(self.images.index(im.tobytes()), n) for im in images])

    def embed_texts(self, texts):
        n = len(self.images)
        rows = np.zeros((len(texts), n), np.float32)
        for row, text in enumerate(texts):  # a caption of several items: all their one-hots
            for i, caption in enumerate(self.captions):
                rows[row, (i + self.shift) % n] += caption == text
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


class BagOfWords:
    """Texts: normalised word counts (order-blind); images: a fixed vector."""

    def embed_images(self, images):
        return np.tile(one_hot(0, len(WORDS)) + 0.1, (len(images), 1))

    def embed_texts(self, texts):
        out = np.zeros((len(texts), len(WORDS)), np.float32)
        for i, text in enumerate(texts):
            for word in text.replace(",", " ").split():
                if word in WORDS:
                    out[i, WORDS.index(word)] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_zero_shot_reads_colour_and_is_at_chance_on_shape():
    evaluator = retrieval.ZeroShot.shapes(["heldout", "train"], 30, resolution=RES)
    metrics = evaluator(ColorReader())
    assert metrics["zero_shot/heldout/color"] == 1.0
    assert metrics["zero_shot/train/color"] == 1.0
    # No shape information: every class ties and argmax picks the first (circle).
    labels = evaluator.sets["train"][1]["shape"]
    assert metrics["zero_shot/train/shape"] == pytest.approx(np.mean(np.asarray(labels) == 0))
    assert metrics["zero_shot/train/shape"] < 0.5
    # Given the colour, every class still ties on shape: circle again.
    assert metrics["zero_shot/train/shape_given_color"] == metrics["zero_shot/train/shape"]


def test_retrieval_recall_of_a_lookup_and_an_off_by_one_lookup():
    evaluator = retrieval.Retrieval.shapes(["heldout"], 24, resolution=RES)
    images, captions = evaluator.sets["heldout"]
    assert all(m == 1.0 for m in evaluator(Lookup(images, captions)).values())
    shifted = evaluator(Lookup(images, captions, shift=1))
    assert shifted["retrieval/heldout/i2t_r1"] < 0.2 and shifted["retrieval/heldout/t2i_r1"] < 0.2


def test_recalls_ties_count_against_and_same_captions_are_no_rivals():
    img = np.eye(3, dtype=np.float32)
    txt = np.ones((3, 3), np.float32) / np.sqrt(3)  # every text ties
    got = retrieval.recalls(img, txt, ["a", "b", "c"], ks=(1, 3))
    assert got == {"i2t_r1": 0.0, "t2i_r1": 0.0, "i2t_r3": 1.0, "t2i_r3": 1.0}
    got = retrieval.recalls(img, txt, ["a", "a", "a"], ks=(1,))  # no rivals left
    assert got == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_hard_negatives_of_a_lookup_and_a_bag_of_words():
    evaluator = retrieval.HardNegatives.shapes(["heldout"], 8, resolution=RES)
    items = evaluator.sets["heldout"]
    assert {k for it in items for k in it.negatives} == set(retrieval.NEGATIVE_KINDS)
    lookup = Lookup([it.image for it in items], [it.caption for it in items])
    metrics = evaluator(lookup)  # a foil embeds to zeros: the true caption always wins
    assert all(v == 1.0 for v in metrics.values()), metrics
    bag = evaluator(BagOfWords())
    assert bag["hard_negatives/heldout/colors"] == 0.0  # same words, exchanged: a tie, wrong


def test_hard_negative_specs():
    red_circle, blue_star = ObjectSpec("circle", "red"), ObjectSpec("star", "blue")
    spec = PromptSpec((red_circle, blue_star), relation="left of")
    got = retrieval.hard_negative_specs(spec)
    assert got["relation"].relation == "right of"
    assert [o.color for o in got["colors"].objects] == ["blue", "red"]
    assert "count" not in got
    three = PromptSpec((ObjectSpec("heart", "green", count=3),))
    assert [retrieval.hard_negative_specs(three, i)["count"].objects[0].count for i in (0, 1)] == [
        4,
        2,
    ]
    assert retrieval.hard_negative_specs(PromptSpec((red_circle,))) == {}


def test_evaluators_by_name_and_bad_names():
    evals = embedding_evals_config(metrics=("zero_shot",), splits=("heldout",), size=6)
    (evaluator,) = retrieval.make_embedding_evaluators(evals, resolution=RES)
    names = {f"zero_shot/heldout/{k}" for k in ("color", "shape", "shape_given_color")}
    assert set(evaluator(ColorReader())) == names
    with pytest.raises(ValueError, match="expected some of"):
        retrieval.make_embedding_evaluators(
            embedding_evals_config(metrics=("fid",)), resolution=RES
        )
    with pytest.raises(ValueError, match="evals.splits holds 'test'"):
        retrieval.make_embedding_evaluators(
            embedding_evals_config(splits=("test",)), resolution=RES
        )
