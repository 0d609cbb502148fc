"""Evaluators of generated images: FID and KID with the standard FID Inception.

`inception` (the network, its weights, resizing, feature extraction), `fid` (Fréchet
distance, KID, statistics files), `folder` (a folder of samples -> FID / KID). Modules are
imported by name, e.g. `from imagen_jax.evaluation import fid`.
"""
