"""Calibration and evaluation data: plain text for next-token prediction, labelled sets for classification.

Every example becomes token ids plus what it is scored on:
- text: every position predicts the next token (`targets[i]` is the gold token after position i);
- classification (SST-2 TSV, AG News CSV): a prompt ending where the label word should come,
  scored at the last position among the label words only.
Files with invalid UTF-8, no content, wrong columns or unknown labels are refused with the
file name and line number.
"""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError

DOC_SEPARATOR = re.compile(r"^\s*<\|endoftext\|>\s*$")


@dataclass(frozen=True)
class Task:
    """A classification task: how a row becomes a prompt, and the word each label maps to."""

    name: str
    template: str  # with {text}; the label word follows the prompt
    label_words: dict[str, str]  # label value in the file -> word (with its leading space)
    demo_separator: str = "\n"


TASKS = {
    "sst2": Task("sst2", "Review: {text}\nSentiment:", {"0": " negative", "1": " positive"}),
    "agnews": Task("agnews", "Article: {text}\nTopic:", {"1": " World", "2": " Sports", "3": " Business", "4": " Technology"}),
}


@dataclass
class Example:
    """One document (text task) or one prompt (classification)."""

    doc_id: int
    ids: list[int]
    # text: gold next token at each position (-1 where unknown); classification: unused
    targets: list[int] = field(default_factory=list)
    # classification: index of the gold label among the task's label words
    gold_label: Optional[int] = None


@dataclass
class Dataset:
    task: str  # "text" or a TASKS key
    examples: list[Example]
    label_token_ids: list[int] = field(default_factory=list)  # classification: first token of each label word
    label_names: list[str] = field(default_factory=list)

    @property
    def is_classification(self) -> bool:
        return self.task != "text"


def _read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: invalid UTF-8") from None


def read_documents(path: Path) -> list[str]:
    """Documents separated by `<|endoftext|>` lines or, failing those, by blank lines."""
    text = _read_text(path)
    lines = text.splitlines()
    if any(DOC_SEPARATOR.match(l) for l in lines):
        docs, current = [], []
        for line in lines:
            if DOC_SEPARATOR.match(line):
                docs.append("\n".join(current))
                current = []
            else:
                current.append(line)
        docs.append("\n".join(current))
    else:
        docs = re.split(r"\n\s*\n", text)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise InputError(f"{path}: no text (empty or only blank lines)")
    return docs


def read_rows(path: Path, task: str) -> list[tuple[str, str, int]]:
    """(text, label, line number) rows of an SST-2 TSV or AG News CSV file."""
    text = _read_text(path)
    rows = []
    if task == "sst2":
        lines = text.splitlines()
        if not lines or lines[0].strip().split("\t") != ["sentence", "label"]:
            raise InputError(f"{path}:1: expected the SST-2 header 'sentence<TAB>label'")
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                raise InputError(f"{path}:{number}: expected 2 tab-separated columns, found {len(parts)}")
            rows.append((parts[0].strip(), parts[1].strip(), number))
    elif task == "agnews":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["label", "title", "description"]:
            raise InputError(f"{path}:1: expected the AG News header 'label,title,description'")
        for row in reader:
            number = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != 3:
                raise InputError(f"{path}:{number}: expected 3 columns (label,title,description), found {len(row)}")
            rows.append((f"{row[1].strip()}. {row[2].strip()}".replace("\\", " "), row[0].strip(), number))
    else:
        raise InputError(f"unknown task {task!r}; choose text, {', '.join(TASKS)}")
    if not rows:
        raise InputError(f"{path}: no rows")
    known = TASKS[task].label_words
    for _, label, number in rows:
        if label not in known:
            raise InputError(f"{path}:{number}: unknown label {label!r} (expected one of {', '.join(known)})")
    return rows


def stratified(order: list[int], labels: list[str]) -> list[int]:
    """The same rows, reordered so that labels take turns (each label's rows keep their order):
    any prefix or slice of the result is (nearly) balanced."""
    queues: dict[str, list[int]] = {}
    for i in order:
        queues.setdefault(labels[i], []).append(i)
    out, depth = [], 0
    while len(out) < len(order):
        for label in sorted(queues):
            if depth < len(queues[label]):
                out.append(queues[label][depth])
        depth += 1
    return out


def load_dataset(path: Path, task: str, encode: Callable[[str], list[int]], *, shots: int = 0, seed: int = 0,
                 limit: Optional[int] = None, skip: int = 0, max_tokens: int = 512, stratify: bool = False) -> Dataset:
    """Tokenize a data file for `task` ("text", "sst2" or "agnews").

    Documents (or, for classification, rows in the seed's shuffled order) `skip` .. `skip + limit`
    are used: calibrating on `limit=n` and evaluating on `skip=n` with the same seed never overlap.
    `stratify` (classification) lets the labels take turns in that order, so every slice is balanced."""
    if task == "text":
        docs = read_documents(path)[skip:]
        if limit is not None:
            docs = docs[:limit]
        examples = []
        for doc_id, doc in enumerate(docs):
            ids = encode(doc)[:max_tokens]
            if len(ids) < 2:
                continue
            examples.append(Example(doc_id=doc_id, ids=ids, targets=ids[1:] + [-1]))
        if not examples:
            raise InputError(f"{path}: no document has two tokens or more")
        return Dataset(task="text", examples=examples)

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose text, {', '.join(TASKS)}")
    spec = TASKS[task]
    rows = read_rows(path, task)
    label_values = list(spec.label_words)
    label_ids = []
    context = spec.template.format(text="x")
    context_ids = encode(context)
    for value in label_values:
        # the label's token is the first one the word adds after the prompt, as the model will see it
        word_ids = encode(context + spec.label_words[value])
        if word_ids[: len(context_ids)] != context_ids or len(word_ids) == len(context_ids):
            raise InputError(f"task {task}: label word {spec.label_words[value]!r} does not tokenize after the prompt")
        label_ids.append(word_ids[len(context_ids)])
    if len(set(label_ids)) != len(label_ids):
        raise InputError(f"task {task}: label words share their first token; pick other words")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    demo_pool = order[:shots * 4] if shots else []
    eval_rows = [i for i in order if i not in set(demo_pool)]
    if stratify:
        eval_rows = stratified(eval_rows, [r[1] for r in rows])
    eval_rows = eval_rows[skip:]
    if limit is not None:
        eval_rows = eval_rows[:limit]
    examples = []
    for doc_id, index in enumerate(eval_rows):
        text, label, _ = rows[index]
        demos = rng.sample(demo_pool, shots) if shots else []
        prefix = "".join(spec.template.format(text=rows[d][0]) + spec.label_words[rows[d][1]] + spec.demo_separator
                         for d in demos)
        ids = encode(prefix + spec.template.format(text=text))
        if len(ids) > max_tokens:
            ids = ids[:1] + ids[len(ids) - max_tokens + 1:]  # keep BOS and the end, where the label goes
        examples.append(Example(doc_id=doc_id, ids=ids, gold_label=label_values.index(label)))
    return Dataset(task=task, examples=examples, label_token_ids=label_ids,
                   label_names=[spec.label_words[v].strip() for v in label_values])
