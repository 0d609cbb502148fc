"""Converts pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth, a PyTorch
state dict) to safetensors, the only format the FID evaluator reads.

    python tools/convert_inception.py --convert=pt_inception-2015-12-05-6726825d.pth \
        --out=fid_inception.safetensors

The .pth is read with torch's weights-only loader (no code is unpickled); torch is needed
here only.
"""

from absl import app, flags

from imagen_jax.evaluation import inception

flags.DEFINE_string("convert", None, "The PyTorch state dict (.pth) to convert.")
flags.DEFINE_string("out", None, "The safetensors file to write.")
flags.mark_flags_as_required(["convert", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    inception.convert(f.convert, f.out)
    print(f"wrote {f.out} (sha256 {inception.file_sha256(f.out)})")


if __name__ == "__main__":
    app.run(main)
