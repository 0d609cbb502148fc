"""Captioning metrics: CIDEr-D against reference captions, and, for the shapes domain, parse
accuracy against the image's true scene.

CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation", the
"-D" variant of the coco-caption package, `pycocoevalcap/cider/cider_scorer.py`), computed
as that code does so that the numbers compare with published ones:

* each sentence is its n-grams, n = 1..4, with their counts (term frequencies);
* document frequency df(g): the number of images among whose references g occurs; each
  n-gram weighs tf * (log(number of images) - log(max(1, df))), over the reference set of
  the images scored together (so a score depends on the whole set, and one image alone
  scores 0);
* per n, the candidate's and each reference's weight vectors are compared with a clipped
  cosine: sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref, divided by both
  norms, times the length penalty exp(-(l_cand - l_ref)^2 / (2 sigma^2)), sigma = 6, where a
  sentence's "length" is, as in that code, its count of bigrams (words - 1);
* the image's score is the mean over n and over its references, times 10; the corpus score
  the mean over images.

The coco-caption package first runs the Stanford PTB tokenizer (Java): lower case,
punctuation dropped. `tokenize` approximates it in Python (lower case, the package's
punctuation tokens dropped, "'s"-style clitics split off); pass pre-tokenized text with
`tokenized=True` to score exactly what another tokenizer produced. Parity with
pycocoevalcap's `Cider` on pre-tokenized input: tests/evaluation/test_captioning_eval.py.

Parse accuracy (shapes domain): the caption, parsed by `shapes.grammar.parse_prompt`, must
describe the image's true scene: every object, colour, size, count, relation and background
it states holds, and nothing it states is wrong; a caption the grammar cannot read is wrong.
Leaving things out is not wrong. Precisely (`judge_caption`): the scorer's check of the
caption's constraints on the scene (`scorer.check` with no task: every stated constraint,
colour and size bound to every object of a named shape) and, on top, exact counts: the
caption's groups of a shape add up to the number of objects of that shape in the scene ("a
star" is wrong where there are two; shapes it does not name may be there).

How the true scene is known, per record:
* "scene" (a rendered dataset scene, `shapes.spec.Scene.to_dict()`): the renderer's scene
  is the truth, exactly (objects, sizes, positions, background; relations by GenEval's rule
  on the exact boxes, `geometry.relations`), with no image read.
* else the prompt ("spec", or "prompt" parsed): the image was sampled from it, so the
  prompt states the intended scene, but a generator may fail to draw it. The shapes scorer
  checks the image against every constraint of the prompt (`scorer.score` with no task);
  where it passes, the image shows the prompt, and what the scorer read from it (which
  agrees with the prompt and also holds what the prompt left open: background, sizes,
  positions) is the truth. Where it fails, the scene is not known: the image is
  "unverified", counted apart and not scored (so a generator's failures do not count
  against the captioner).
Records whose prompt is outside the shapes domain are skipped and counted.

Results per kind of scene (the task the record names, or `shapes.accuracy.infer_task` of
its prompt; "unknown" for a scene without one): accuracy and count, and the overall
accuracy over all judged captions.

Closing the loop (images sampled from shapes prompts): two readers of the same image answer
"does it show its prompt?", the shapes scorer (`scorer.score`) and the captioner, whose
caption agrees with the prompt when it states everything the prompt states
(`caption_states_prompt`: each named shape in the prompt's exact count, with the prompt's
colours and sizes, its relation between the same objects, its background); it may say more.
`loop_table` counts the four cells and the rate at which the two verdicts agree, which
checks both: a captioner that reads scenes right and a scorer that does agree on every
image, drawn right or not.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax import files
from imagen_jax.evaluation.evaluators import Samples
from imagen_jax.shapes import accuracy as shapes_accuracy
from imagen_jax.shapes import geometry, grammar, scorer
from imagen_jax.shapes.spec import BACKGROUNDS, ObjectSpec, PromptSpec, Scene

CIDER_N = 4
CIDER_SIGMA = 6.0
# The coco-caption package's PTBTokenizer drops these tokens.
PUNCTUATION = (
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
)  # fmt: skip
_TOKEN = re.compile(r"\.\.\.|--|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|n't\b|[\w]+|[^\w\s]")


# ----------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------


def tokenize(text: str) -> str:
    """Lower case, punctuation dropped, words and clitics space-separated (an approximation
    of coco-caption's PTB tokenization)."""
    tokens = _TOKEN.findall(text.lower())
    return " ".join(t for t in tokens if t not in PUNCTUATION)


def _ngram_counts(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = collections.defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _tfidf(counts, doc_freq, log_images: float, n: int):
    """(weights per n, their norms, the sentence's length: its count of bigrams)."""
    vec: list[dict] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        w = float(tf) * (log_images - np.log(max(1.0, doc_freq.get(gram, 0.0))))
        vec[k][gram] = w
        norm[k] += pow(w, 2)
        if k == 1:
            length += tf
    return vec, [np.sqrt(x) for x in norm], length


def _similarity(cand, ref, n: int, sigma: float) -> np.ndarray:
    (vec, norm, length), (vec_r, norm_r, length_r) = cand, ref
    delta = float(length - length_r)
    val = np.zeros(n)
    for k in range(n):
        for gram, w in vec[k].items():
            w_r = vec_r[k].get(gram, 0.0)
            val[k] += min(w, w_r) * w_r
        if norm[k] != 0 and norm_r[k] != 0:
            val[k] /= norm[k] * norm_r[k]
        val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
    return val


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenized: bool = False,
    n: int = CIDER_N,
    sigma: float = CIDER_SIGMA,
) -> tuple[float, np.ndarray]:
    """(corpus CIDEr-D, per-image scores [N]) of one candidate per image against that
    image's references (at least one each). tokenized: the texts are already tokenized
    (space-separated, as compared); else `tokenize` runs first."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D needs at least one image")
    prep = (lambda s: s) if tokenized else tokenize
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str) or not group:
            raise ValueError(f"image {i}: expected a non-empty list of reference captions")
        refs.append([_ngram_counts(prep(r), n) for r in group])
    cands = [_ngram_counts(prep(c), n) for c in candidates]
    doc_freq: dict = collections.defaultdict(float)
    for group in refs:
        for gram in {g for r in group for g in r}:
            doc_freq[gram] += 1
    log_images = np.log(float(len(refs)))
    scores = []
    for cand, group in zip(cands, refs, strict=True):
        c = _tfidf(cand, doc_freq, log_images, n)
        total = np.zeros(n)
        for r in group:
            total += _similarity(c, _tfidf(r, doc_freq, log_images, n), n, sigma)
        scores.append(float(np.mean(total)) / len(group) * 10.0)
    scores = np.asarray(scores)
    return float(np.mean(scores)), scores


# ----------------------------------------------------------------------------------------------
# Parse accuracy (shapes)
# ----------------------------------------------------------------------------------------------


def scene_reading(scene: Scene) -> scorer.Reading:
    """A rendered scene as the scorer's `Reading`: its exact objects (boxes of the drawn
    outlines) and background, the truth a caption is checked against."""
    objects = tuple(
        scorer.Detection(
            shape=o.shape,
            color=o.color,
            x=o.x,
            y=o.y,
            bbox=geometry.bbox(o),
            size=o.size,
            rotation=o.rotation,
            shape_distance=0.0,
            shape_margin=math.inf,
            residual=0.0,
        )
        for o in scene.objects
    )
    rgb = tuple(float(v) for v in BACKGROUNDS[scene.background])
    return scorer.Reading(scene.background, rgb, objects)


def judge_caption(caption: str, truth: scorer.Reading) -> tuple[bool, tuple[str, ...]]:
    """(whether the caption describes the scene, why not): see the module docstring."""
    try:
        spec = grammar.parse_prompt(caption)
    except ValueError as e:
        return False, (f"{UNPARSEABLE}: {e}",)
    failures = list(scorer.check(truth, spec.constraints()).failures)
    stated = collections.Counter()
    for group in spec.objects:
        stated[group.shape] += group.count
    present = collections.Counter(o.shape for o in truth.objects if o.shape is not None)
    for shape, count in stated.items():
        if present[shape] != count:
            failures.append(
                f"the caption states {count} {shape}(s), the scene has {present[shape]}"
            )
    return not failures, tuple(failures)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One caption's verdict: status "correct" | "wrong" | "unverified" (the image does not
    show its prompt) | "skipped" (a prompt outside the shapes domain); the kind of scene."""

    status: str
    task: str
    reasons: tuple[str, ...] = ()


UNKNOWN_TASK = "unknown"
UNPARSEABLE = "unparseable"


def _record_task(record: dict) -> str:
    try:
        spec, _ = shapes_accuracy.record_spec(record)
    except (ValueError, KeyError):  # OutOfDomain included; no prompt
        return record.get("task") or UNKNOWN_TASK
    return spec.task


def judge(caption: str, record: dict, image: np.ndarray | None = None) -> Verdict:
    """The verdict on a caption of the image that `record` describes ("scene", or the
    "prompt" / "spec" it was sampled from; then `image` is needed)."""
    if record.get("scene") is not None:
        truth = scene_reading(Scene.from_dict(record["scene"]))
        task = _record_task(record)
    else:
        try:
            spec, _ = shapes_accuracy.record_spec(record)
        except shapes_accuracy.OutOfDomain as e:
            return Verdict("skipped", UNKNOWN_TASK, (str(e),))
        if image is None:
            raise ValueError("a record without a 'scene' needs its image to verify the prompt")
        shown = scorer.score(np.asarray(image), spec.constraints())
        if not shown.passed:
            return Verdict("unverified", spec.task, shown.failures)
        truth, task = shown.reading, spec.task
    ok, reasons = judge_caption(caption, truth)
    return Verdict("correct" if ok else "wrong", task, reasons)


def caption_states_prompt(caption: str, prompt: PromptSpec) -> tuple[bool, tuple[str, ...]]:
    """(whether the caption states everything `prompt` states, what it misses): each shape
    the prompt names in the same total count, with the prompt's colour and size on as many
    of its objects as the prompt puts them; the prompt's relation between objects of the
    same shapes and colours (either wording: "a left of b" is "b right of a"); its
    background. What the prompt leaves open the caption may state as it likes."""
    try:
        said = grammar.parse_prompt(caption)
    except ValueError as e:
        return False, (f"{UNPARSEABLE}: {e}",)
    missing = []
    for shape in dict.fromkeys(g.shape for g in prompt.objects):
        wanted = [g for g in prompt.objects if g.shape == shape]
        have = [g for g in said.objects if g.shape == shape]
        n_wanted, n_have = sum(g.count for g in wanted), sum(g.count for g in have)
        if n_wanted != n_have:
            missing.append(f"{n_wanted} {shape}(s) in the prompt, {n_have} in the caption")
            continue
        objects = [(g.color, g.size) for g in have for _ in range(g.count)]
        for g in wanted:  # stated attributes first claim the caption's objects
            for _ in range(g.count):
                match = next(
                    (o for o in objects if g.color in (None, o[0]) and g.size in (None, o[1])),
                    None,
                )
                if match is None:
                    missing.append(f"the prompt's {_describe(g)} is not in the caption")
                    break
                objects.remove(match)
    if prompt.relation is not None:
        want, got = prompt.canonical(), said.canonical()
        same = got.relation == want.relation and all(
            a.shape == b.shape and a.color in (None, b.color)
            for a, b in zip(want.objects, got.objects, strict=True)
        )
        if not same:
            missing.append(f"the prompt's relation {want.relation!r} is not the caption's")
    if prompt.background is not None and said.background != prompt.background:
        missing.append(f"background {prompt.background!r}, the caption's {said.background!r}")
    return not missing, tuple(missing)


def _describe(group: ObjectSpec) -> str:
    return " ".join(w for w in (group.size, group.color, group.shape) if w)


def loop_table(shown: Sequence[bool], agrees: Sequence[bool]) -> dict[str, Any]:
    """The scorer's verdicts (the image shows its prompt) against the captions' (the caption
    states the prompt), per image: the four cells and the agreement rate."""
    pairs = list(zip(shown, agrees, strict=True))
    cells = {
        "both": sum(s and a for s, a in pairs),
        "scorer_only": sum(s and not a for s, a in pairs),
        "caption_only": sum(a and not s for s, a in pairs),
        "neither": sum(not s and not a for s, a in pairs),
    }
    rate = float(np.mean([s == a for s, a in pairs])) if pairs else math.nan
    return {
        "images": len(pairs),
        **cells,
        "agreement": rate,
        "scorer_accuracy": float(np.mean(shown)) if pairs else math.nan,
        "caption_accuracy": float(np.mean(agrees)) if pairs else math.nan,
    }


def summarize(verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """Per kind of scene {accuracy, correct, total}, the overall accuracy of the judged
    captions, and the counts of unverified and skipped ones."""
    judged = [v for v in verdicts if v.status in ("correct", "wrong")]
    tasks = {}
    for task in sorted({v.task for v in judged}):
        rows = [v.status == "correct" for v in judged if v.task == task]
        tasks[task] = {"accuracy": float(np.mean(rows)), "correct": sum(rows), "total": len(rows)}
    return {
        "tasks": tasks,
        "overall": float(np.mean([v.status == "correct" for v in judged])) if judged else math.nan,
        "judged": len(judged),
        "unparseable": sum(
            bool(v.reasons) and v.reasons[0].startswith(UNPARSEABLE) for v in judged
        ),
        "unverified": sum(v.status == "unverified" for v in verdicts),
        "skipped": sum(v.status == "skipped" for v in verdicts),
    }


# ----------------------------------------------------------------------------------------------
# Evaluators (the protocol of `evaluation.evaluators`)
# ----------------------------------------------------------------------------------------------


def references_of(record: dict) -> list[str]:
    """A record's reference captions: "references" (a list), else its "prompt"."""
    refs = record.get("references")
    if refs is None and isinstance(record.get("prompt"), str):
        refs = [record["prompt"]]
    if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"record {record.get('file', '')!r} has no reference captions")
    return list(refs)


class CiderD:
    """CIDEr-D of each record's "caption" against its references (`references_of`):
    `cider_d` (the corpus mean, as coco-caption reports it)."""

    name = "cider_d"

    def __init__(self, *, tokenized: bool = False):
        self.tokenized = tokenized

    def __call__(self, samples: Samples) -> dict[str, float]:
        captions = [r["caption"] for r in samples.records]
        score, _ = cider_d(
            captions, [references_of(r) for r in samples.records], tokenized=self.tokenized
        )
        return {self.name: score}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": CIDER_N,
            "sigma": CIDER_SIGMA,
            "tokenizer": "pre-tokenized" if self.tokenized else "imagen_jax (PTB approximation)",
            "convention": "coco-caption CIDEr-D (pycocoevalcap cider_scorer)",
        }


class CaptionParseAccuracy:
    """Parse accuracy of each record's "caption" against its image's true scene (`judge`):
    `caption_parse/<task>`, `caption_parse/overall`, and the counts
    `caption_parse/unverified`, `caption_parse/skipped`, `caption_parse/unparseable`."""

    name = "caption_parse"

    def __call__(self, samples: Samples) -> dict[str, float]:
        verdicts = [
            judge(r["caption"], r, image)
            for image, r in zip(samples.images, samples.records, strict=True)
        ]
        return self.metrics(verdicts)

    def metrics(self, verdicts: Sequence[Verdict]) -> dict[str, float]:
        table = summarize(verdicts)
        out = {f"{self.name}/{t}": row["accuracy"] for t, row in table["tasks"].items()}
        out[f"{self.name}/overall"] = table["overall"]
        for key in ("unparseable", "unverified", "skipped"):
            out[f"{self.name}/{key}"] = float(table[key])
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parser": "imagen_jax.shapes.grammar.parse_prompt",
            "truth": "record scene, else the scorer's reading of an image that shows its prompt",
        }


# ----------------------------------------------------------------------------------------------
# A captions.jsonl against references (eval/captioning.py)
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSONL file with a string 'file' each; errors name the line."""
    return [obj for _, obj in files.read_jsonl(path)]


def caption_records(captions: str, references: str | None = None) -> list[dict]:
    """One record per line of a captions.jsonl (`pipelines.captioning_jobs`): its "file",
    "caption", "prompt" and metadata, flat; with a references JSONL (lines with "file" and
    "references" (a list), or "caption" / "prompt" (several lines per file add up), and
    optionally "scene", "spec", "task"), those replace the captions' own prompt as the
    references and the truth."""
    records = []
    for line in read_jsonl(captions):
        if not isinstance(line.get("caption"), str):
            raise ValueError(f"{captions}: {line['file']!r} has no string 'caption'")
        records.append(
            {**line.get("metadata", {}), **{k: v for k, v in line.items() if k != "metadata"}}
        )
    if references is None:
        return records
    refs: dict[str, dict] = {}
    for ref in read_jsonl(references):
        entry = refs.setdefault(ref["file"], {"references": []})
        texts = ref.get("references")
        if texts is None:
            texts = [t for t in (ref.get("caption"), ref.get("prompt")) if isinstance(t, str)][:1]
        entry["references"] += list(texts)
        entry.update({k: ref[k] for k in ("scene", "spec", "task", "prompt") if k in ref})
    missing = [r["file"] for r in records if r["file"] not in refs]
    if missing:
        raise ValueError(
            f"{references} has no references for {len(missing)} captioned images "
            f"(first: {missing[0]!r})"
        )
    out = []
    for r in records:
        merged = {k: v for k, v in r.items() if k not in ("prompt", "spec", "task", "scene")}
        out.append({**merged, **refs[r["file"]]})
    return out


def _shapes_records(records: Sequence[dict]) -> bool:
    """Whether any record belongs to the shapes domain (a scene, or a prompt it reads)."""
    for r in records:
        if r.get("scene") is not None:
            return True
        try:
            shapes_accuracy.record_spec(r)
            return True
        except (ValueError, KeyError):
            continue
    return False


def evaluate_captions(
    captions: str, *, references: str | None = None, images: str | None = None
) -> dict[str, Any]:
    """CIDEr-D of a captions.jsonl against its references, and, where the records are of
    the shapes domain, parse accuracy (`images`: the captioned folder, needed for records
    without a "scene"). Returns {"images", "cider_d", "parse": summarize(...) or None,
    "parse_note": why parse accuracy is missing, or None, "loop": `loop_table` of the
    images sampled from shapes prompts, or None}."""
    from imagen_jax.images import load_rgb  # the images are read only for parse accuracy

    records = caption_records(captions, references)
    if not records:
        raise ValueError(f"{captions} holds no captions")
    score, _ = cider_d([r["caption"] for r in records], [references_of(r) for r in records])
    out: dict[str, Any] = {
        "images": len(records),
        "cider_d": score,
        "parse": None,
        "parse_note": None,
        "loop": None,
    }
    if not _shapes_records(records):
        out["parse_note"] = "no record is of the shapes domain"
        return out
    if images is None and any(r.get("scene") is None for r in records):
        out["parse_note"] = "give the images folder to verify the prompts' scenes (--images)"
        return out
    verdicts, shown, agrees = [], [], []
    for r in records:
        image = None if r.get("scene") is not None else load_rgb(os.path.join(images, r["file"]))
        verdict = judge(r["caption"], r, image)
        verdicts.append(verdict)
        if image is not None and verdict.status != "skipped":  # sampled from a shapes prompt
            spec, _ = shapes_accuracy.record_spec(r)
            shown.append(verdict.status != "unverified")
            agrees.append(caption_states_prompt(r["caption"], spec.constraints())[0])
    out["parse"] = summarize(verdicts)
    out["loop"] = loop_table(shown, agrees) if shown else None
    return out


def format_report(report: dict[str, Any]) -> str:
    """The report of `evaluate_captions` as text."""
    lines = [f"CIDEr-D {report['cider_d']:.4f} over {report['images']} images"]
    parse = report["parse"]
    if parse is None:
        lines.append(f"parse accuracy: not computed ({report['parse_note']})")
        return "\n".join(lines)
    for task, row in parse["tasks"].items():
        lines.append(
            f"parse {task:<14} {row['accuracy']:.4f}  {row['correct']:>5} / {row['total']}"
        )
    lines.append(
        f"parse {'overall':<14} {parse['overall']:.4f}  ({parse['judged']} judged, "
        f"{parse['unparseable']} unparseable; {parse['unverified']} unverified: the image does "
        f"not show its prompt; {parse['skipped']} skipped: outside the shapes domain)"
    )
    loop = report.get("loop")
    if loop:
        lines.append(
            f"loop: {loop['images']} images sampled from shapes prompts; the scorer says "
            f"{loop['scorer_accuracy']:.4f} show their prompt, the captions state their "
            f"prompt for {loop['caption_accuracy']:.4f}; the two agree on "
            f"{loop['agreement']:.4f} (both {loop['both']}, scorer only "
            f"{loop['scorer_only']}, caption only {loop['caption_only']}, neither "
            f"{loop['neither']})"
        )
    return "\n".join(lines)
