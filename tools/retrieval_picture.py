"""The README's retrieval picture: held-out shapes scenes ranked for text queries by an
embedding model.

    .venv/bin/python tools/retrieval_picture.py --model=runs/emb/embedding \
        --out=docs/shapes_retrieval.png

Renders --scenes scenes of the held-out split (drawn from --seed, every task, at the
model's resolution), embeds them once, and for each --queries text draws one row: the query,
then its --k closest scenes, best first, each over its cosine and a green bar where the
shapes scorer finds the query true of the scene (its task's checks, as in the compositional
evaluation), red where not. The queries name held-out colour-shape pairs (red star, orange
heart, yellow circle, purple square, green cross, blue triangle), which training never
showed.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from imagen_jax import logs
from imagen_jax.pipelines import embedding
from imagen_jax.shapes import grammar, render, scorer, tasks

QUERIES = (
    "a red star",
    "a red star above a blue circle",
    "two orange hearts",
    "a yellow circle to the left of a purple square",
    "a green cross and a blue square",
)

flags.DEFINE_string("model", None, "An embedding model directory.")
flags.mark_flag_as_required("model")
flags.DEFINE_string("out", "docs/shapes_retrieval.png", "The picture.")
flags.DEFINE_list("queries", list(QUERIES), "Text queries, one row each.")
flags.DEFINE_integer("scenes", 600, "Held-out scenes to rank.")
flags.DEFINE_integer("k", 6, "Images per row.")
flags.DEFINE_integer("seed", 0, "The scenes' seed.")
flags.DEFINE_integer("scale", 2, "Pixels per image pixel in the picture.")

LABEL_W, PAD, BAR = 260, 6, 4


def main(argv):
    del argv
    logs.quiet_logs()
    f = flags.FLAGS
    embedder = embedding.load_embedder(f.model)
    res = embedder.processor.output_size(1, 1)[0]
    rng = np.random.default_rng(f.seed)
    images = [
        render.render(tasks.sample_scene(rng, split="heldout")[0], res) for _ in range(f.scenes)
    ]
    image_embeds = embedder.embed_images(images)
    text_embeds = embedder.embed_texts(list(f.queries))
    cell = res * f.scale
    width = LABEL_W + f.k * (cell + PAD)
    height = len(f.queries) * (cell + 2 * PAD + 14)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for row, (query, q) in enumerate(zip(f.queries, text_embeds, strict=True)):
        top = row * (cell + 2 * PAD + 14) + PAD
        draw.text((PAD, top + cell // 2 - 6), f'"{query}"', fill="black")
        spec = grammar.parse_prompt(query)
        scores = image_embeds @ q
        for i, j in enumerate(np.argsort(-scores, kind="stable")[: f.k]):
            left = LABEL_W + i * (cell + PAD)
            tile = Image.fromarray(images[j]).resize((cell, cell), Image.NEAREST)
            picture.paste(tile, (left, top))
            colour = (40, 170, 60) if scorer.score(images[j], spec).passed else (200, 50, 40)
            draw.rectangle([left, top + cell + 1, left + cell - 1, top + cell + BAR], fill=colour)
            draw.text((left, top + cell + BAR + 1), f"{scores[j]:.2f}", fill="black")
    picture.save(f.out)
    print(f"wrote {f.out}: {len(f.queries)} queries over {f.scenes} held-out scenes")


if __name__ == "__main__":
    app.run(main)
