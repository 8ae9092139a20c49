"""Small offline data sets for measuring forgetting (no download, no data hub).

* :func:`general_text` - general English: ``general_en.txt``, thirty short encyclopaedic paragraphs on everyday
  topics (rivers, bread, the heart, bees, printing, ...), written for forgetkern and released with it under the
  project's licence. Split by paragraph into a held-out evaluation part and a replay part (disjoint).
* :func:`general_mc` - general-knowledge multiple choice: ``general_mc.jsonl``, 64 four-way questions of
  common knowledge (also written for forgetkern), scored by log-likelihood like lm-eval-harness.
* :func:`cloze_mc` - sentence-completion multiple choice built from the held-out paragraphs: the first part of
  a sentence with its true ending and endings of other sentences as distractors (HellaSwag-style), seeded.
* :func:`python_source` - a narrow domain every Python install ships: the source files of pure-Python standard
  library modules (PSF licence), split by module into training and evaluation files.
* :func:`python_reference` - a second narrow domain, prose instead of code: the Python language reference's
  topics as ``help()`` shows them (``pydoc_data.topics``, PSF licence), split by topic. The second task of the
  sequential setting (task A: code, then task B: the reference).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import re
from typing import Dict, List, Sequence, Tuple

_HERE = pathlib.Path(__file__).parent

# Pure-Python standard library modules present in every CPython 3.9+; split by module so the evaluation files
# are code the model never trains on.
PYTHON_TRAIN_MODULES = ("textwrap", "json.decoder", "json.encoder", "csv", "fractions", "statistics", "heapq",
                        "bisect", "shlex", "calendar", "difflib", "fnmatch", "pprint", "queue", "string",
                        "colorsys", "glob", "ipaddress", "configparser", "dataclasses")
PYTHON_EVAL_MODULES = ("gettext", "netrc", "plistlib", "quopri", "sched", "tabnanny", "uu" , "wave", "zipapp",
                       "getopt", "graphlib", "numbers", "operator", "reprlib", "stringprep")


def _paragraphs() -> List[str]:
    text = (_HERE / "general_en.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def general_text(split: str = "eval") -> List[str]:
    """General-English paragraphs: ``split="eval"`` (every third paragraph, held out) or ``"replay"`` (the
    rest, for replay mixing and Fisher estimation), or ``"all"``."""
    paras = _paragraphs()
    if split == "all":
        return paras
    if split == "eval":
        return paras[::3]
    if split == "replay":
        return [p for i, p in enumerate(paras) if i % 3]
    raise ValueError(f"general_text: split must be 'eval', 'replay' or 'all', got {split!r}")


def general_mc() -> List[Dict]:
    """``[{"context", "choices", "answer"}]``: the general-knowledge questions in lm-eval's prompt format."""
    items = []
    for line in (_HERE / "general_mc.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items.append({"context": f"Question: {row['q']}\nAnswer:", "choices": [" " + c for c in row["choices"]],
                          "answer": row["answer"]})
    return items


def _sentences(paras: Sequence[str]) -> List[str]:
    out = []
    for p in paras:
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) >= 10]
    return out


def cloze_mc(split: str = "eval", *, choices: int = 4, seed: int = 0) -> List[Dict]:
    """Sentence completion: the first 60% of the words of each sentence of ``general_text(split)`` as the context,
    its own ending and ``choices - 1`` endings of other sentences (seeded) as the options."""
    sents = _sentences(general_text(split))
    rng = random.Random(seed)
    cut: List[Tuple[str, str]] = []
    for s in sents:
        words = s.split()
        k = max(3, int(0.6 * len(words)))
        cut.append((" ".join(words[:k]), " " + " ".join(words[k:])))
    items = []
    for i, (ctx, end) in enumerate(cut):
        others = [cut[j][1] for j in rng.sample([j for j in range(len(cut)) if j != i], choices - 1)]
        answer = rng.randrange(choices)
        opts = others[:answer] + [end] + others[answer:]
        items.append({"context": ctx, "choices": opts, "answer": answer})
    return items


def python_source(split: str = "train") -> List[str]:
    """Source texts of standard-library modules: ``split="train"`` or ``"eval"`` (disjoint modules)."""
    if split not in ("train", "eval"):
        raise ValueError(f"python_source: split must be 'train' or 'eval', got {split!r}")
    names = PYTHON_TRAIN_MODULES if split == "train" else PYTHON_EVAL_MODULES
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # removed from this Python version (e.g. uu in 3.13)
        out.append(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    return out


def python_reference(split: str = "train") -> List[str]:
    """The language reference's topics (``pydoc_data.topics``: statements, expressions, the data model...):
    ``split="eval"`` (every fourth topic in name order, held out) or ``"train"`` (the rest)."""
    if split not in ("train", "eval"):
        raise ValueError(f"python_reference: split must be 'train' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    keep = names[::4] if split == "eval" else [n for i, n in enumerate(names) if i % 4]
    return [topics[n] for n in keep]
