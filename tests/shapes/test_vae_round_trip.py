"""The VAE round-trip score: an untrained VAE keeps nothing the prompts state."""

from imagen_jax.evaluation.vae_round_trip import round_trip
from imagen_jax.training.latent_space import RANDOM, load_frozen_vae


def test_an_untrained_vae_passes_no_round_trip():
    model, _ = load_frozen_vae(RANDOM)
    result = round_trip(model, 48, 80, n=6)
    assert result["size"] == [48, 80] and result["images"] == 6
    assert result["passed"] == 0.0 and sum(result["failures"].values()) == 6
    assert result["psnr"] < 15.0
