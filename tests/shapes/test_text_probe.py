"""The text probe: its classifier finds what is linearly there and nothing else, and on the
frozen all-MiniLM-L6-v2 the object's role is plain while its side is faint, and a shape's
colour is plain even for pairs no training prompt has."""

import numpy as np

from imagen_jax.proj.shapes.text_probe import (
    binding_probe,
    fit_token_reader,
    linear_probe,
    position_prompts,
    refiner_transfer,
    task_prompts,
    text_probe,
    wording_transfer,
)
from imagen_jax.shapes import parse_prompt
from imagen_jax.shapes.wordings import SENTENCES


def test_linear_probe_reads_a_linear_fact_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16))
    labels = x @ rng.normal(size=16) > 0
    accuracy, separation = linear_probe(x, labels)
    assert accuracy > 0.95 and separation > 0.3
    accuracy, separation = linear_probe(x, rng.random(2000) < 0.5)
    assert abs(accuracy - 0.5) < 0.06 and separation < 0.1
    xor = (x[:, 0] > 0) ^ (x[:, 1] > 0)  # not linear in x
    assert abs(linear_probe(x, xor)[0] - 0.5) < 0.06


def test_position_prompts_are_captions_of_their_specs():
    for spec, text in position_prompts(50, seed=1):
        assert spec.relation is not None
        got = parse_prompt(text)
        assert got.relation == spec.relation and got.objects == spec.objects, text


def test_minilm_tokens_carry_the_role_plainly_and_the_side_faintly():
    result = text_probe(prompts=600, seed=0)
    assert result["tokens"] >= 1000
    assert result["subject"]["accuracy"] > 0.97
    assert result["relation"]["accuracy"] > 0.8
    # Which object is on the left is read worse than either fact it follows from, and it
    # is far smaller among what the token carries than the object's role in the sentence.
    assert result["side"]["accuracy"] < result["relation"]["accuracy"]
    assert result["side"]["separation"] < 0.5 * result["subject"]["separation"]


def test_minilm_shape_tokens_carry_their_colour_for_pairs_never_trained_on():
    """A reader fitted on training prompts names the colour of a held-out colour-shape
    pair from the shape noun's token: the binding is in the frozen tokens, linearly."""
    result = binding_probe(prompts=600, seed=0)
    assert result["tokens"] >= 500
    assert result["trained_pairs"] > 0.95
    assert result["heldout_pairs"] > 0.9
    assert result["separation"] > 0.1


def test_prompts_in_each_wording_set_are_captions_of_their_specs():
    for wordings in ("train", "heldout"):
        for spec, text in task_prompts("color_attr", 30, seed=2, wordings=wordings):
            want = spec.constraints().canonical()
            assert parse_prompt(text).canonical() == want, text


def test_what_the_tokens_carry_in_training_wordings_reads_worse_in_held_out_ones():
    """Readers fitted on training-wording captions: the binding reads plainly in held-out
    training wordings but falls in held-out wordings; the side is near chance there."""
    result = wording_transfer(prompts=900, seed=0)
    assert result["side"]["tokens"] >= 300 and result["binding"]["tokens"] >= 300
    assert result["binding"]["train_wordings"] > 0.85
    assert result["binding"]["heldout_wordings"] < result["binding"]["train_wordings"] - 0.1
    assert result["side"]["heldout_wordings"] < 0.65


def test_a_token_reader_needs_the_refiner_for_a_fact_spread_over_two_tokens():
    """The label is the exclusive-or of the two tokens' first coordinates (+-1): a linear
    read of the site's token alone cannot tell it, a reader with refiner layers (attention
    to the other token, then an MLP) can."""
    rng = np.random.default_rng(0)
    tokens = (0.1 * rng.normal(size=(2000, 2, 64))).astype(np.float32)
    tokens[:, :, 0] = np.sign(rng.normal(size=(2000, 2)))
    text = {"text": tokens, "text_mask": np.ones((2000, 2), bool)}
    sites = np.stack([np.arange(2000), np.zeros(2000, np.int64)], axis=1)
    labels = ((tokens[:, 0, 0] > 0) ^ (tokens[:, 1, 0] > 0)).astype(np.int32)
    fit, score = slice(0, 1500), slice(1500, None)
    for depth, low, high in ((0, 0.0, 0.6), (2, 0.85, 1.0)):
        predict = fit_token_reader(text, sites[fit], labels[fit], 2, depth=depth, steps=400)
        accuracy = np.mean(predict(text, sites[score]) == labels[score])
        assert low <= accuracy <= high, (depth, accuracy)


def test_a_token_refiner_reads_the_binding_in_wordings_it_was_not_fitted_on():
    """Where the linear reader of a noun's frozen token loses more than 0.1 in held-out
    wordings (test above), a trained refiner over the caption's tokens keeps the binding.
    At 900 prompts and 400 steps, seeds 0-3 read 0.96-0.99 on training wordings and
    0.94-0.96 on held-out ones; at 600 and 300 the fit was short of the first (0.86-0.95)."""
    result = refiner_transfer(prompts=900, depths=(2,), steps=400, questions=("binding",))
    r = result["binding"][2]
    assert r["train_wordings"] > 0.9
    assert r["heldout_wordings"] > 0.85
    assert set(r["by_template"]) <= {name for name, t in SENTENCES.items() if t.split == "heldout"}
