"""The rules that score an Ask's answer, and the question set they score it
against; bench/answers.py runs the questions and reports the figures.

Questions: bench/answers_questions.json, written by hand from the topic texts
and phrased as a user would ask. Each answerable one has a short gold answer,
accepted variants, the topic that holds the answer and a `support`: a passage
of that topic (whitespace folded) that proves it. Unanswerable ones are
plausible Python questions whose answer is in no topic (third-party
libraries, facts the reference does not state); each names `absent` terms,
which must occur in no topic. load_questions() checks both and fails loudly.

Rules (the same for every generator):

- Normalisation: SQuAD's (lowercase, articles dropped, whitespace folded)
  except that punctuation other than "_" becomes a space instead of
  vanishing, so "str.casefold()" keeps the token "casefold" and "__all__"
  stays apart from "all"; citation markers [n] are dropped first.
- correct: the normalised gold answer or a variant occurs as a run of tokens
  in the normalised answer. F1: SQuAD token F1, best over gold and variants.
- A cited passage supports the answer when its text contains the support's
  tokens in order, or when its longest run of tokens in common with the
  support covers >= 50% of the support's tokens (a support cut by a chunk
  boundary). Citation precision = supporting citations / all citations over
  the answerable questions; a marker [n] past the passages given counts as an
  unsupported citation. "support retrieved": some passage given supports it,
  the ceiling for every generator.
- abstains: the first sentence of the answer holds one of ABSTAIN_PHRASES, or
  the generator finished with "no_answer". The extractive generator quotes
  passages and never abstains; a quoted sentence can still match a phrase.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCH_DIR

QUESTIONS = BENCH_DIR / "answers_questions.json"
# What an answer that declines says; matched in its first sentence, lowercased.
ABSTAIN_PHRASES = (
    "cannot answer",
    "can't answer",
    "can not answer",
    "unable to answer",
    "not able to answer",
    "cannot be answered",
    "can't be answered",
    "i don't know",
    "i do not know",
    "no information",
    "not enough information",
    "insufficient information",
    "does not contain",
    "do not contain",
    "doesn't contain",
    "don't contain",
    "does not mention",
    "do not mention",
    "doesn't mention",
    "don't mention",
    "not mentioned",
    "does not provide",
    "do not provide",
    "not provided",
    "does not say",
    "do not say",
    "not specified",
    "not in the context",
    "not in the passages",
    "no answer",
)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
# Curly quotes, as the topics print them, are punctuation too.
_PUNCTUATION = str.maketrans(
    {c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d" if c != "_"}
)
_ARTICLES = {"a", "an", "the"}
_FIRST_SENTENCE = re.compile(r"^.*?(?:[.!?](?:\s|$)|\n|$)", re.S)


@dataclass(frozen=True)
class Question:
    """One question; gold, variants, topic and support only when answerable."""

    id: str
    question: str
    answerable: bool
    answer: str = ""
    variants: tuple[str, ...] = ()
    topic: str = ""
    support: str = ""


def fold(text: str) -> str:
    """Whitespace runs folded to one space."""
    return " ".join(text.split())


def tokens(text: str, *, drop_articles: bool = True) -> list[str]:
    """Normalised tokens (see the module docstring)."""
    words = _CITATION.sub(" ", text).lower().translate(_PUNCTUATION).split()
    return [w for w in words if not (drop_articles and w in _ARTICLES)]


def contains_run(haystack: list[str], needle: list[str]) -> bool:
    """Whether needle occurs in haystack as consecutive tokens."""
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """SQuAD's token F1."""
    common = sum(
        min(prediction.count(w), reference.count(w)) for w in set(prediction) & set(reference)
    )
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def supports(passage: str, support: str) -> bool:
    """Whether a passage holds the support, in full or >= 50% as one run of tokens."""
    have, want = tokens(passage, drop_articles=False), tokens(support, drop_articles=False)
    if contains_run(have, want):
        return True
    match = difflib.SequenceMatcher(None, have, want, autojunk=False).find_longest_match(
        0, len(have), 0, len(want)
    )
    return match.size * 2 >= len(want)


def cited_numbers(answer: str) -> tuple[int, ...]:
    """The passage numbers cited as [n] or [n, m], in order of first citation."""
    seen: list[int] = []
    for group in _CITATION.findall(answer):
        for number in (int(n) for n in group.split(",")):
            if number not in seen:
                seen.append(number)
    return tuple(seen)


def abstains(answer: str, finish_reason: str) -> bool:
    """Whether the answer declines (see ABSTAIN_PHRASES)."""
    match = _FIRST_SENTENCE.match(answer.strip())
    first = (match.group(0) if match else answer).lower().replace("\u2019", "'")
    return finish_reason == "no_answer" or any(p in first for p in ABSTAIN_PHRASES)


def load_questions(path: Path = QUESTIONS) -> list[Question]:
    """The question set, checked against the topic texts; raises ValueError on any flaw."""
    from pydoc_data.topics import topics

    folded = {name: fold(text) for name, text in topics.items()}
    lowered = "\n".join(folded.values()).lower()
    questions: list[Question] = []
    problems: list[str] = []
    for row in json.loads(path.read_text()):
        q = Question(
            row["id"],
            row["question"],
            row["answerable"],
            row.get("answer", ""),
            tuple(row.get("variants", ())),
            row.get("topic", ""),
            row.get("support", ""),
        )
        if q.answerable:
            if q.topic not in folded:
                problems.append(f"{q.id}: no pydoc topic {q.topic!r}")
            elif fold(q.support) not in folded[q.topic]:
                problems.append(f"{q.id}: support not in topic {q.topic!r}: {q.support!r}")
            for reference in (q.answer, *q.variants):
                if not tokens(reference):
                    problems.append(f"{q.id}: {reference!r} normalises to nothing")
        else:
            for term in row.get("absent", ()):
                if term.lower() in lowered:
                    problems.append(f"{q.id}: {term!r} occurs in the topics: not unanswerable")
            if not row.get("absent"):
                problems.append(f"{q.id}: an unanswerable question names no absent terms")
        questions.append(q)
    if len({q.id for q in questions}) != len(questions):
        problems.append("question ids repeat")
    if problems:
        raise ValueError(f"{path.name} is wrong:\n  " + "\n  ".join(problems))
    return questions
