"""Captioning metrics: CIDEr-D against pycocoevalcap's Cider (the coco-caption code) on
several caption sets, and shapes parse accuracy on hand-made cases, against rendered scenes
and against images sampled from prompts (verified by the shapes scorer)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from imagen_jax.evaluation import captioning
from imagen_jax.evaluation.evaluators import Samples
from imagen_jax.shapes import grammar, render
from imagen_jax.shapes.spec import Scene, SceneObject

ROOT = pathlib.Path(__file__).resolve().parents[2]

COCO_LIKE = {  # pre-tokenized, lower case, as coco-caption's PTB tokenizer leaves them
    "candidates": [
        "a man riding a horse on a beach",
        "two dogs playing in the snow",
        "a plate of food with broccoli",
        "a red bus parked on the street",
        "a cat",
    ],
    "references": [
        ["a man rides a horse along the beach", "a person on a horse by the ocean",
         "man riding a brown horse on the sand"],
        ["two dogs play in the snow", "a pair of dogs running through snow"],
        ["a plate with broccoli and rice", "food on a white plate", "broccoli and meat on a dish",
         "a meal of broccoli"],
        ["a red double decker bus on a city street", "a bus parked by the curb"],
        ["a cat sitting on a couch", "a black cat lying down"],
    ],
}  # fmt: skip


def _random_set(seed: int, images: int):
    rng = np.random.default_rng(seed)
    words = [f"w{k}" for k in range(12)]

    def sentence():
        return " ".join(rng.choice(words, int(rng.integers(1, 14))))

    cands = [sentence() for _ in range(images)]
    refs = [[sentence() for _ in range(int(rng.integers(1, 6)))] for _ in range(images)]
    return cands, refs


def _pycocoevalcap(cands, refs):
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores)


@pytest.mark.parametrize(
    "caption_set",
    ["coco_like", "random_3", "random_20", "identical"],
)
def test_cider_d_equals_pycocoevalcap(caption_set):
    if caption_set == "coco_like":
        cands, refs = COCO_LIKE["candidates"], COCO_LIKE["references"]
    elif caption_set == "identical":  # candidates equal to a reference, repeated n-grams
        refs = [["a a a b", "b c"], ["c c d", "a b c d"], ["d"]]
        cands = [r[0] for r in refs]
    else:
        cands, refs = _random_set(int(caption_set.split("_")[1]), int(caption_set.split("_")[1]))
    want, want_each = _pycocoevalcap(cands, refs)
    got, got_each = captioning.cider_d(cands, refs, tokenized=True)
    assert abs(got - want) <= 1e-6, (got, want)
    np.testing.assert_allclose(got_each, want_each, atol=1e-6, rtol=0)
    assert want > 0


def test_cider_d_known_values():
    # One image: every n-gram is in every "document", so every weight is log(1) - log(1) = 0.
    assert captioning.cider_d(["a cat"], [["a cat"]])[0] == 0.0
    # Two images, candidates equal to their single references with no shared n-gram: each
    # cosine is 1 for n = 1..4 where the sentence has such n-grams, and 0 where it has none
    # (4 words: all four orders): the score is 10 * mean over n.
    score, each = captioning.cider_d(["a b c d", "e f"], [["a b c d"], ["e f"]])
    np.testing.assert_allclose(each, [10.0, 5.0])
    assert math.isclose(score, 7.5)


def test_tokenize_is_ptb_like():
    assert captioning.tokenize("A Man's  dog, running!") == "a man 's dog running"
    got = captioning.cider_d(["A cat."], [["a cat"]], tokenized=False)
    assert got == captioning.cider_d(["a cat"], [["a cat"]], tokenized=True)


# ----------------------------------------------------------------------------------------------
# Parse accuracy
# ----------------------------------------------------------------------------------------------

SCENE = Scene(
    (
        SceneObject("circle", "red", 0.2, 0.25, 0.5),
        SceneObject("square", "blue", 0.28, 0.75, 0.5),
    ),
    background="white",
)
STARS = Scene(
    tuple(
        SceneObject("star", "green", 0.18, x, y)
        for x, y in ((0.22, 0.25), (0.75, 0.3), (0.45, 0.75))
    )
)


@pytest.mark.parametrize(
    ("caption", "status", "why"),
    [
        ("a red circle to the left of a blue square", "correct", ""),
        ("a red circle and a large blue square on a white background", "correct", ""),
        ("a circle", "correct", ""),  # leaving things out is not wrong
        ("a green circle left of a blue square", "wrong", "asks for green circle"),
        ("a red circle to the right of a blue square", "wrong", "is not right of"),
        ("a blue square on a black background", "wrong", "black background"),
        ("a small blue square", "wrong", "asks for small blue square"),
        ("a red circle and a heart", "wrong", "expected a heart"),
        ("the sun over a lake", "wrong", "unparseable"),
    ],
)
def test_parse_accuracy_on_a_rendered_scene(caption, status, why):
    verdict = captioning.judge(caption, {"scene": SCENE.to_dict(), "task": "position"})
    assert verdict.status == status, verdict
    assert verdict.task == "position"
    assert why in " ".join(verdict.reasons)


@pytest.mark.parametrize(
    ("caption", "ok"),
    [("three green stars", True), ("two green stars", False), ("a star", False),
     ("four stars", False), ("3 stars", True)],
)  # fmt: skip
def test_counts_are_exact(caption, ok):
    verdict = captioning.judge(caption, {"scene": STARS.to_dict(), "task": "counting"})
    assert (verdict.status == "correct") == ok, verdict


def test_sampled_images_are_judged_on_what_the_scorer_verified():
    """An image sampled from a prompt: judged when the scorer says it shows its prompt (then
    what it read is the truth, background included), "unverified" when it does not."""
    shown = render.render(SCENE, 64)
    record = {"prompt": "a red circle left of a blue square"}
    good = captioning.judge("a red circle left of a blue square on a white background",
                            record, shown)  # fmt: skip
    assert good.status == "correct" and good.task == "position"
    assert captioning.judge("a red circle below a blue square", record, shown).status == "wrong"
    other = render.render(STARS, 64)  # the generator drew something else
    assert captioning.judge("three green stars", record, other).status == "unverified"
    out = captioning.judge("a cat", {"prompt": "a photo of a cat"}, other)
    assert out.status == "skipped"


@pytest.mark.parametrize(
    "caption, prompt, ok",
    [
        ("a red circle left of a blue square", "a blue square right of a red circle", True),
        ("a red circle left of a blue square on a white background", "a red circle", True),
        ("a red circle left of a blue square", "a circle to the left of a square", True),
        ("a blue circle left of a blue square", "a red circle left of a blue square", False),
        ("a red circle above a blue square", "a red circle left of a blue square", False),
        ("a red circle and a blue square", "a red circle left of a blue square", False),
        ("two green stars", "three green stars", False),
        ("two green stars and a red star", "three stars", True),
        ("two green stars and a red star", "three green stars", False),
        ("a small red heart", "a large red heart", False),
        ("a red heart on a black background", "a red heart on a white background", False),
        ("nothing here", "a red heart", False),
    ],
)
def test_a_caption_states_its_prompt(caption, prompt, ok):
    got, why = captioning.caption_states_prompt(caption, grammar.parse_prompt(prompt))
    assert got == ok, why
    assert bool(why) != ok


def test_loop_table_counts_the_cells():
    shown, agrees = [True, True, False, False, True], [True, False, True, False, True]
    table = captioning.loop_table(shown, agrees)
    assert (table["both"], table["scorer_only"], table["caption_only"], table["neither"]) == (
        2, 1, 1, 1,
    )  # fmt: skip
    assert table["agreement"] == 0.6 and table["scorer_accuracy"] == 0.6


def test_the_evaluators_report_per_task():
    scenes = [SCENE, SCENE, STARS, STARS]
    records = [
        {"caption": "a red circle left of a blue square", "task": "position",
         "references": ["a red circle left of a blue square"]},
        {"caption": "a green circle left of a blue square", "task": "position",
         "references": ["a red circle to the left of a blue square"]},
        {"caption": "three green stars", "task": "counting", "references": ["three green stars"]},
        {"caption": "nothing here", "task": "counting", "references": ["3 green stars"]},
    ]  # fmt: skip
    for r, scene in zip(records, scenes, strict=True):
        r["scene"] = scene.to_dict()
    samples = Samples([None] * 4, records)
    metrics = captioning.CaptionParseAccuracy()(samples)
    assert metrics["caption_parse/position"] == 0.5
    assert metrics["caption_parse/counting"] == 0.5
    assert metrics["caption_parse/overall"] == 0.5
    assert metrics["caption_parse/unparseable"] == 1.0
    cider = captioning.CiderD()(samples)["cider_d"]
    want, _ = _pycocoevalcap(
        [captioning.tokenize(r["caption"]) for r in records],
        [[captioning.tokenize(x) for x in r["references"]] for r in records],
    )
    assert abs(cider - want) <= 1e-6


def test_eval_main_scores_a_captions_file(tmp_path):
    images = tmp_path / "samples"
    (images / "images").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(render.render(SCENE, 64)).save(images / "images" / "0.png")
    Image.fromarray(render.render(STARS, 64)).save(images / "images" / "1.png")
    lines = [
        {"file": "images/0.png", "caption": "a red circle left of a blue square",
         "prompt": "a red circle to the left of a blue square", "metadata": {"seed": 0}},
        {"file": "images/1.png", "caption": "two green stars", "prompt": "three green stars",
         "metadata": {"task": "counting"}},
    ]  # fmt: skip
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report_path = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "eval/captioning.py", f"--captions={captions}", f"--images={images}",
         f"--json={report_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["parse"]["tasks"] == {
        "counting": {"accuracy": 0.0, "correct": 0, "total": 1},
        "position": {"accuracy": 1.0, "correct": 1, "total": 1},
    }
    want, _ = _pycocoevalcap(
        [captioning.tokenize(x["caption"]) for x in lines],
        [[captioning.tokenize(x["prompt"])] for x in lines],
    )
    assert abs(report["cider_d"] - want) <= 1e-6
    assert "parse position" in out.stdout
    # image 0 shows its prompt and its caption states it; image 1 shows three stars, not
    # two as captioned: the scorer and the caption disagree there
    assert report["loop"] == {
        "images": 2, "both": 1, "scorer_only": 1, "caption_only": 0, "neither": 0,
        "agreement": 0.5, "scorer_accuracy": 1.0, "caption_accuracy": 0.5,
    }  # fmt: skip
    assert "the two agree on 0.5000" in out.stdout
