"""FID (and KID) of a folder of images with the standard FID Inception.

    python eval/fid.py --samples=DIR --ref_stats=REF.npz --inception=WEIGHTS \
        [--resize=pytorch_fid|clean_fid] [--kid_ref_features=FEATS.npz] [--json=OUT.json]
    python eval/fid.py --samples=DIR --inception=WEIGHTS --save_stats=OUT.npz \
        [--save_features=FEATS.npz]

DIR holds the images: those `manifest.jsonl` lists, else every PNG/JPEG under DIR.
WEIGHTS is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read with torch) or its
safetensors conversion (`python tools/convert_inception.py --convert`). REF.npz
holds `mu` and `sigma` (pytorch-fid's and clean-fid's statistics files work); a reference
must be computed with the same --resize. All logic lives in
`imagen_jax/evaluation/folder.py`; this prints the result as JSON (naming the weights file,
the resize convention and the image count) and writes it to --json if given.
"""

import json

from absl import app, flags

from imagen_jax import logs
from imagen_jax.evaluation import fid, folder, inception

_SAMPLES = flags.DEFINE_string("samples", None, "Folder of images (manifest.jsonl or PNG/JPEG).")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception weights (.pth/.safetensors).")
_REF_STATS = flags.DEFINE_string("ref_stats", None, "Reference statistics .npz (mu, sigma).")
_RESIZE = flags.DEFINE_enum(
    "resize", "pytorch_fid", inception.RESIZE_MODES, "Resize convention to 299x299."
)
_KID_REF = flags.DEFINE_string("kid_ref_features", None, "Reference features for KID.")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", fid.KID_SUBSETS, "KID: number of subsets.")
_KID_SIZE = flags.DEFINE_integer(
    "kid_subset_size", fid.KID_SUBSET_SIZE, "KID: subset size (capped at the image counts)."
)
_KID_SEED = flags.DEFINE_integer("kid_seed", fid.KID_SEED, "KID: seed of the subset draws.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Images per Inception batch (all devices).")
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the folder's mu/sigma here.")
_SAVE_FEATURES = flags.DEFINE_string("save_features", None, "Write the folder's features here.")
_JSON = flags.DEFINE_string("json", None, "Also write the result here, as JSON.")
flags.mark_flags_as_required(["samples", "inception"])


def main(argv):
    del argv
    logs.quiet_logs()
    if not (_REF_STATS.value or _KID_REF.value or _SAVE_STATS.value or _SAVE_FEATURES.value):
        raise app.UsageError(
            "nothing to do: give --ref_stats, --kid_ref_features, --save_stats or --save_features"
        )
    result = folder.evaluate_folder(
        _SAMPLES.value,
        inception_path=_INCEPTION.value,
        ref_stats=_REF_STATS.value,
        kid_ref_features=_KID_REF.value,
        resize=_RESIZE.value,
        batch_size=_BATCH.value,
        kid_subsets=_KID_SUBSETS.value,
        kid_subset_size=_KID_SIZE.value,
        kid_seed=_KID_SEED.value,
        save_stats=_SAVE_STATS.value,
        save_features=_SAVE_FEATURES.value,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
