"""Training data: jsonl files of ``{query, positive, negatives?, teacher_scores?}``.

One example per line. ``positive`` and each negative are either a string or a BEIR-style
``{"title": ..., "text": ...}`` object. ``teacher_scores`` (for distillation) holds one score per
candidate, the positive first, then the negatives in file order. Loading is strict by default:
every problem is reported as ``file:line: message`` and nothing is trained on a file that does
not fully parse; ``skip_bad=True`` drops bad lines with a warning instead.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..prompts import beir_document

log = logging.getLogger("e5kit.train")

MAX_REPORTED = 20  # problems listed in one error message


class DataError(ValueError):
    """The training file has lines that cannot be used; ``problems`` lists (line, message)."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]]):
        self.path, self.problems = str(path), problems
        shown = "\n".join(f"  {self.path}:{n}: {m}" for n, m in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        super().__init__(f"{len(problems)} bad line(s) in {self.path}; fix them or pass skip_bad_lines "
                         f"(--skip-bad-lines) to drop them:\n{shown}{more}")


@dataclass
class Example:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    teacher_scores: list[float] | None = None  # positive first, then negatives
    line: int = 0


def passage_text(value, what: str) -> str:
    """A passage given as a string or a BEIR {title, text} object, as one non-empty string."""
    if isinstance(value, dict):
        if not isinstance(value.get("text"), str):
            raise ValueError(f"{what} is an object without a string 'text'")
        title = value.get("title")
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{what} has a non-string 'title'")
        value = beir_document(title, value["text"])
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string (or a {{title, text}} object), not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def parse_example(obj, line: int = 0) -> Example:
    """Validate one decoded json line; raises ValueError with a message naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("query", "positive"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
    query = passage_text(obj["query"], "'query'")
    positive = passage_text(obj["positive"], "'positive'")
    negs = obj.get("negatives") or []
    if not isinstance(negs, list):
        raise ValueError("'negatives' must be a list")
    negatives = [passage_text(n, f"'negatives'[{i}]") for i, n in enumerate(negs)]
    scores = obj.get("teacher_scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise ValueError("'teacher_scores' must be a list of numbers")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError("'teacher_scores' has a NaN or infinite value")
        if len(scores) != 1 + len(negatives):
            raise ValueError(f"'teacher_scores' has {len(scores)} values; expected {1 + len(negatives)} "
                             f"(the positive, then each negative)")
        scores = [float(s) for s in scores]
    return Example(query, positive, negatives, scores, line)


def load_examples(path: str | Path, skip_bad: bool = False, negatives: int = 0,
                  distill: bool | None = None) -> list[Example]:
    """Read and validate a training jsonl file.

    ``negatives``: hard negatives each example must supply (examples with fewer but at least one
    have theirs reused). ``distill``: require teacher_scores on every line (True), ignore them
    (False), or require all-or-none (None). Blank lines are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training file {path} does not exist")
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append((n, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append((n, f"not valid JSON ({e.msg}, column {e.colno})"))
                continue
            try:
                ex = parse_example(obj, n)
                if negatives and not ex.negatives:
                    raise ValueError(f"no 'negatives', but training uses {negatives} hard negative(s) per query "
                                     f"(set negatives: 0 for pair data, or mine some with `e5kit mine`)")
                if distill and ex.teacher_scores is None:
                    raise ValueError("no 'teacher_scores', but distillation is on")
            except ValueError as e:
                problems.append((n, str(e)))
                continue
            examples.append(ex)
    if distill is None and examples:
        with_scores = [e for e in examples if e.teacher_scores is not None]
        if with_scores and len(with_scores) != len(examples):
            first = next(e for e in examples if e.teacher_scores is None)
            problems.append((first.line, f"no 'teacher_scores', but {len(with_scores)} other lines have them "
                                         f"(distillation needs them on every line)"))
            if skip_bad:
                examples = with_scores
    if problems:
        if not skip_bad:
            raise DataError(path, problems)
        for n, m in problems[:MAX_REPORTED]:
            log.warning("skipping %s:%d: %s", path, n, m)
        log.warning("skipped %d bad line(s) of %s; %d examples kept", len(problems), path, len(examples))
    if distill is False:
        for e in examples:
            e.teacher_scores = None
    if not examples:
        raise DataError(path, problems or [(0, "no examples in the file")])
    return examples


def pick_negatives(ex: Example, n: int, rng: random.Random) -> tuple[list[str], list[float] | None]:
    """``n`` hard negatives for this example (a random subset, or reused when it has fewer), with
    the matching teacher scores (positive first)."""
    if n == 0:
        return [], (ex.teacher_scores[:1] if ex.teacher_scores else None)
    k = len(ex.negatives)
    idx = rng.sample(range(k), n) if k >= n else [i % k for i in range(n)]
    if k < n:
        rng.shuffle(idx)
    scores = None
    if ex.teacher_scores is not None:
        scores = [ex.teacher_scores[0]] + [ex.teacher_scores[1 + i] for i in idx]
    return [ex.negatives[i] for i in idx], scores


class Schedule:
    """Which examples form global batch ``step``: a seeded permutation per epoch, incomplete final
    batches dropped (so every step has the same shape on every process), and a process's share
    is a contiguous slice of the global batch."""

    def __init__(self, n_examples: int, global_batch: int, seed: int, shuffle: bool = True):
        if global_batch > n_examples:
            raise ValueError(f"the global batch ({global_batch}) is larger than the data ({n_examples} examples)")
        self.n, self.global_batch, self.seed, self.shuffle = n_examples, global_batch, seed, shuffle
        self.steps_per_epoch = n_examples // global_batch
        self._epoch, self._order = -1, list(range(n_examples))

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(self.n))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[int, list[int]]:
        """(epoch, example indices) for this process at global step ``step`` (0-based)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        start = b * self.global_batch
        ids = self.order(epoch)[start:start + self.global_batch]
        per = self.global_batch // world
        return epoch, ids[rank * per:(rank + 1) * per]


__all__ = ["DataError", "Example", "passage_text", "parse_example", "load_examples", "pick_negatives", "Schedule"]
