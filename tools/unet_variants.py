"""Prints the parameter count of every Imagen UNet variant (`imagen_unet.VARIANTS`).

python tools/unet_variants.py
"""

from absl import app

from imagen_jax.models import imagen_unet


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for name in imagen_unet.VARIANTS:
        params = imagen_unet.count_params(imagen_unet.make_config(name))
        print(f"{name:22s} {params / 1e6:10.1f} M parameters")


if __name__ == "__main__":
    app.run(main)
