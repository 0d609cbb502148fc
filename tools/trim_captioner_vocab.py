"""A GIT captioner directory with its vocabulary cut to the tokens a domain's captions use.

A captioner trained with a stock BERT tokenizer keeps 30,522 rows of word embeddings and of
its output layer, nearly all of them words its domain never says: the shipped shapes
captioner spent 7.9 of its 8.8 MB on them. This keeps the special tokens and every token of
`--captions` shapes captions (all three wording sets, both splits, rich and plain), renumbers
them in their old order, and writes the directory again: tokenizer.json and vocab.txt with
the new ids, config.json / generation_config.json with the new vocab_size and special ids,
and model.safetensors with those rows of the word embeddings and of the output layer. A
greedy (or beam) caption is unchanged wherever the full model's choice is a kept token,
which `--check` verifies on rendered held-out scenes (the captions of both directories
must be equal). Text the kept vocabulary lacks reads as [UNK]; captioning reads no text.

    python tools/trim_captioner_vocab.py --model=checkpoints/shapes/captioner \\
        --outdir=/tmp/captioner_trimmed [--captions=50000] [--check=200]
"""

import json
import os
import shutil

import numpy as np
from absl import app, flags
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from imagen_jax.shapes import splits, wordings
from imagen_jax.shapes.tasks import sample_example

flags.DEFINE_string("model", None, "The captioner directory.", required=True)
flags.DEFINE_string("outdir", None, "Where the trimmed directory goes.", required=True)
flags.DEFINE_integer("captions", 50_000, "Shapes captions whose tokens are kept.")
flags.DEFINE_integer("check", 200, "Held-out scenes captioned by both (0: no check).")

# The rows indexed by token id (GIT's word embeddings and its output layer).
VOCAB_ROWS = ("git.embeddings.word_embeddings.weight", "output.weight", "output.bias")
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def domain_token_ids(tokenizer: Tokenizer, n: int) -> set[int]:
    """The ids of every token of n shapes captions, over the wording sets and splits."""
    rng = np.random.default_rng(0)
    ids = set()
    for i in range(n):
        example = sample_example(
            rng,
            split=splits.SPLITS[i % 2],
            rich=bool(i % 3),
            wordings=wordings.WORDINGS[i % len(wordings.WORDINGS)],
        )
        ids.update(tokenizer.encode(example.caption).ids)
    return ids


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def trim(model: str, outdir: str, n_captions: int) -> dict:
    tokenizer_path = os.path.join(model, "tokenizer.json")
    tokenizer_json = _read_json(tokenizer_path)
    vocab = tokenizer_json["model"]["vocab"]
    special = {t["id"] for t in tokenizer_json["added_tokens"]}
    keep = sorted(special | domain_token_ids(Tokenizer.from_file(tokenizer_path), n_captions))
    new_id = {old: new for new, old in enumerate(keep)}
    by_id = {i: tok for tok, i in vocab.items()}

    os.makedirs(outdir, exist_ok=True)
    for name in os.listdir(model):
        if name not in ("tokenizer.json", "vocab.txt", "config.json", "model.safetensors"):
            shutil.copy2(os.path.join(model, name), os.path.join(outdir, name))
    tokenizer_json["model"]["vocab"] = {by_id[old]: new_id[old] for old in keep}
    for token in tokenizer_json["added_tokens"]:
        token["id"] = new_id[token["id"]]
    for entry in (tokenizer_json.get("post_processor") or {}).get("special_tokens", {}).values():
        entry["ids"] = [new_id[i] for i in entry["ids"]]
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    with open(os.path.join(outdir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(by_id[old] + "\n" for old in keep)
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model, name)
        if not os.path.exists(path):
            continue
        config = _read_json(path)
        if "vocab_size" in config:
            config["vocab_size"] = len(keep)
        for key in SPECIAL_IDS:
            if config.get(key) is not None:
                config[key] = new_id[config[key]]
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    weights = load_file(os.path.join(model, "model.safetensors"))
    rows = np.asarray(keep)
    for key in VOCAB_ROWS:
        weights[key] = np.ascontiguousarray(weights[key][rows])
    save_file(weights, os.path.join(outdir, "model.safetensors"))
    return dict(vocab=len(vocab), kept=len(keep))


def check(model: str, outdir: str, n: int) -> int:
    """Captions of n rendered held-out scenes by both directories; raises if any differ."""
    from imagen_jax.pipelines import captioning
    from imagen_jax.shapes.render import render

    rng = np.random.default_rng(1)
    images = [render(sample_example(rng, split="heldout").scene, 64) for _ in range(n)]
    before = captioning.load_captioner(model, batch_size=50)(images)
    after = captioning.load_captioner(outdir, batch_size=50)(images)
    differ = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    if differ:
        raise SystemExit(f"{len(differ)} of {n} captions differ, e.g. {differ[:3]}")
    return n


def main(argv):
    del argv
    f = flags.FLAGS
    summary = trim(f.model, f.outdir, f.captions)
    if f.check:
        summary["checked_equal_captions"] = check(f.model, f.outdir, f.check)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
