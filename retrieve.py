"""Embeds a folder of images once, then finds the images closest to a text or an image.

    python retrieve.py --model=runs/emb/embedding --images=samples/ --index=idx/
    python retrieve.py --index=idx/ --text="a red star above a blue circle" --k=5
    python retrieve.py --index=idx/ --image=query.png --k=5
    python retrieve.py --model=DIR --images=samples/ --index=idx/ --text="two green hearts"

--model is an image-text embedding model directory: ours (`train.py` with a two_towers
config writes WORKDIR/embedding; see docs/retrieval.md) or a transformers CLIPModel /
SiglipModel directory with its tokenizer.json. With --images, the index (--index: index.json,
embeddings.npy, index.jsonl) gets every image of the folder it does not hold yet; a killed
build resumes where it stopped; an index built with another model or folder is refused,
both named. Images of any size are resized by the model's processor (shortest side, then a
centre crop); unreadable files are named and skipped. With --text or --image, prints the
--k closest images, one "score<TAB>path" line each, best first. Bad input (an empty query, a
directory that is no embedding model, a missing index) stops with one line.
"""

import os
import sys

from absl import app, flags

from imagen_jax import logs
from imagen_jax.pipelines import embedding_index

flags.DEFINE_string("model", None, "An embedding model directory (default: the index's).")
flags.DEFINE_string("images", None, "A folder of images to index (resumes an index).")
flags.DEFINE_string("index", "embedding_index", "The index directory.")
flags.DEFINE_string("text", None, "A text query.")
flags.DEFINE_string("image", None, "An image file as the query.")
flags.DEFINE_integer("k", 5, "How many images to print.")
flags.DEFINE_integer("batch_size", 64, "Images per compiled call.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logs.quiet_logs()
    f = flags.FLAGS
    try:
        if f.images is None and f.text is None and f.image is None:
            raise ValueError("nothing to do: give --images (to index) and/or --text or --image")
        if f.images is not None:
            if f.model is None:
                raise ValueError("--images needs --model (the embedding model to index with)")
            summary = embedding_index.build_index(
                model=f.model, images=f.images, index=f.index, batch_size=f.batch_size
            )
            print(f"index {f.index}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        if f.text is not None or f.image is not None:
            hits = embedding_index.query_index(
                f.index, text=f.text, image=f.image, k=f.k, model=f.model
            )
            folder = embedding_index.images_folder(f.index)
            for file, score in hits:
                print(f"{score:.4f}\t{os.path.join(folder, file)}")
    except (ValueError, OSError) as e:  # bad input: named in one line, no traceback
        sys.exit(f"retrieve.py: {type(e).__name__}: {e}")


if __name__ == "__main__":
    app.run(main)
