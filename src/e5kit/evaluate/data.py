"""Readers for the evaluation sets in their original layouts: BEIR folders, the STS Benchmark
release (tab-separated), and classification csv files (``text,label``)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """An evaluation dataset is missing or not in the expected layout."""


@dataclass
class BeirData:
    corpus: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: dict[str, str]  # only the queries judged in the split
    qrels: dict[str, dict[str, int]]


def _jsonl(path: Path):
    if not path.exists():
        raise DatasetError(f"{path} is missing; a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from e


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """A BEIR dataset: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DatasetError(f"{qrels_path} is missing (splits here: {have or 'none'})")
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for n, row in enumerate(rows, 1):
            if n == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(row) < 3:
                raise DatasetError(f"{qrels_path}:{n}: expected query-id, corpus-id, score")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    corpus = {str(d["_id"]): (d.get("title") or "", d.get("text") or "") for d in _jsonl(folder / "corpus.jsonl")}
    queries = {str(q["_id"]): q["text"] for q in _jsonl(folder / "queries.jsonl") if str(q["_id"]) in qrels}
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DatasetError(f"{len(missing)} judged queries are not in queries.jsonl, e.g. {missing[:3]}")
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)


def load_sts(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """STS pairs: the STS Benchmark release (genre, file, year, id, score, s1, s2; tab-separated),
    or any tsv/csv with columns sentence1, sentence2, score."""
    path = Path(path)
    if path.is_dir():
        path = path / "sts-test.csv"
    if not path.exists():
        raise DatasetError(f"{path} is missing")
    s1, s2, gold = [], [], []
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        if "sentence1" in first:
            reader = csv.DictReader(f, delimiter="\t" if "\t" in first else ",")
            for row in reader:
                s1.append(row["sentence1"]), s2.append(row["sentence2"]), gold.append(float(row["score"]))
        else:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 7:
                    raise DatasetError(f"{path}:{n}: expected 7 tab-separated fields (STS Benchmark layout)")
                gold.append(float(parts[4])), s1.append(parts[5]), s2.append(parts[6])
    return s1, s2, gold


def load_classification(path: str | Path, split: str) -> tuple[list[str], list[str]]:
    """(texts, labels) from ``<folder>/<split>.csv`` with columns text and category (or label)."""
    path = Path(path)
    f = path / f"{split}.csv" if path.is_dir() else path
    if not f.exists():
        raise DatasetError(f"{f} is missing; a classification folder holds train.csv and test.csv (text,category)")
    with open(f, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        label_col = next((c for c in ("category", "label", "labels") if c in (reader.fieldnames or [])), None)
        if "text" not in (reader.fieldnames or []) or label_col is None:
            raise DatasetError(f"{f}: expected columns text and category/label, got {reader.fieldnames}")
        rows = [(r["text"], r[label_col]) for r in reader]
    return [r[0] for r in rows], [r[1] for r in rows]
