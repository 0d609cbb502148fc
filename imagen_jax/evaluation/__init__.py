"""Evaluators of generated images: FID and KID with the standard FID Inception; CLIP score.

`inception` (the network, its weights, resizing, feature extraction), `fid` (Fréchet
distance, KID, statistics files), `folder` (a folder of samples -> FID / KID),
`clip_score` (both CLIP towers, the score, a folder of samples with its prompts -> CLIP
score; the image tower is `imagen_jax.models.vit`, its preprocessing
`imagen_jax.images.ImageProcessor`). Modules are imported by name,
e.g. `from imagen_jax.evaluation import fid`.
"""
