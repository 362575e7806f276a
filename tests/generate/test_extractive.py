"""The extractive generator quotes sentences, not markup (issue 16, "Answers"):
headings, underlines, fences and directives are cleaned from the sentences an
answer quotes, while the stored text (the citations) stays as it was."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from rag_grpc.generate.base import AskEvent
from rag_grpc.generate.extractive import answer_sentences
from rag_grpc.generate.markup import clean_markup, is_markup_only
from tests.conftest import ServerThread, ask_answer, ask_citations, ask_summary

MARKUP_RUN = re.compile(r"[*=\-~^#]{3,}")

CASES = [
    pytest.param(
        "*****\nOverview\n*****\n\nThe cache keeps recent answers.",
        ["The cache keeps recent answers."],
        id="rest-heading-with-overline-and-underline",
    ),
    pytest.param(
        'The "with" statement\n********************\n\n'
        'The "with" statement wraps a block with a context manager.',
        ['The "with" statement wraps a block with a context manager.'],
        id="rest-heading-underlined-with-asterisks",
    ),
    pytest.param(
        "Install\n=======\nRun the installer first.\n\nUsage\n-----\nCall the service next.",
        ["Run the installer first.", "Call the service next."],
        id="setext-headings-without-blank-line-after",
    ),
    pytest.param(
        "# Getting started\n\nThe server listens on port 50051.\n\n### Options ###\n"
        "Every option has a default.",
        ["The server listens on port 50051.", "Every option has a default."],
        id="markdown-atx-headings",
    ),
    pytest.param(
        "Start it like this:\n\n```python\nserver = serve(port=50051)\nserver.wait()\n```\n\n"
        "It stops on SIGTERM.",
        ["Start it like this:", "It stops on SIGTERM."],
        id="fence-with-code-is-not-quoted",
    ),
    pytest.param(
        "~~~\nThe comment in this block is a whole sentence.\n~~~\nAfter the block comes prose.",
        ["The comment in this block is a whole sentence.", "After the block comes prose."],
        id="fence-whose-content-is-a-sentence-keeps-it",
    ),
    pytest.param(
        "Subsection\n~~~~~~~~~~\n\nTildes underline this title.\nThen a fence:\n~~~\n"
        "x = compute(1)\n~~~\nAnd prose again.",
        ["Tildes underline this title.", "Then a fence:", "And prose again."],
        id="tilde-underline-or-tilde-fence",
    ),
    pytest.param(
        "Intro text is here.\n```\nx = compute(1)\n",
        ["Intro text is here."],
        id="fence-left-open-at-chunk-end",
    ),
    pytest.param(
        ".. note::\n   :class: wide\n\n   Notes are kept as prose.\n\n.. _install-label:\n\n"
        ".. versionadded:: 3.8\n\nThe rest follows here.",
        ["Notes are kept as prose.", "The rest follows here."],
        id="rest-directives-options-and-targets",
    ),
    pytest.param(
        "Use **strong** words and ``literal`` names; call :func:`len` or "
        ":meth:`the reader <io.Reader.read>` once.",
        ["Use strong words and literal names; call len or the reader once."],
        id="inline-markup-keeps-its-words",
    ),
    pytest.param(
        "+-------+-------+\n| name  | value |\n+=======+=======+\n\n"
        "| --- | --- |\n\nTables end before this sentence.",
        ["| name | value |", "Tables end before this sentence."],
        id="table-borders",
    ),
    pytest.param(
        "First line of a paragraph\nthat goes on over two lines.\n----\n---\n***\n\n"
        "- a bullet item says something.\n> quoted text says more.",
        [
            "First line of a paragraph that goes on over two lines.",
            "a bullet item says something.",
            "quoted text says more.",
        ],
        id="rules-after-prose-and-bare-markup-lines",
    ),
    pytest.param(
        "Write it as follows::\n\n    print(1)\n",
        ["Write it as follows:"],
        id="rest-literal-block-marker",
    ),
]


@pytest.mark.parametrize(("text", "sentences"), CASES)
def test_answer_sentences_leave_markup_out(text: str, sentences: list[str]) -> None:
    assert answer_sentences(text) == sentences


def test_plain_prose_is_unchanged() -> None:
    prose = "Chess is a board game. Each player starts with sixteen pieces."
    assert clean_markup(prose) == prose
    assert answer_sentences(prose) == [
        "Chess is a board game.",
        "Each player starts with sixteen pieces.",
    ]


@pytest.mark.parametrize("sentence", ["**** ====", "+--+--+", "| | |", "...", "1. 2."])
def test_markup_only_sentences_are_skipped(sentence: str) -> None:
    assert is_markup_only(sentence)
    assert answer_sentences(sentence) == []


PYTHON_DOCS_WITH = Document(
    "with-statement",
    'The "with" statement\n'
    "********************\n\n"
    'The "with" statement is used to wrap the execution of a block with methods\n'
    "defined by a context manager. This allows common try, except and finally\n"
    "usage patterns to be encapsulated for convenient reuse.\n\n"
    "Example\n"
    "=======\n\n"
    "```python\n"
    "with open(path) as f:\n"
    "    data = f.read()\n"
    "```\n\n"
    "The context manager's exit method is always called, even when the block\n"
    "raises an exception.\n",
    {"topic": "python"},
)


def test_ask_answer_quotes_no_markup_but_citation_keeps_it(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server()
    with RagClient(server.target, timeout=60) as client:
        client.upsert([PYTHON_DOCS_WITH])
        events: list[AskEvent] = list(client.ask("What does the with statement do?", k=1))
    citations = ask_citations(events)
    summary = ask_summary(events)
    answer = ask_answer(events)
    assert summary.finish_reason == "stop" and 1 in summary.cited
    assert "context manager" in answer
    assert not MARKUP_RUN.search(answer), answer
    assert "```" not in answer and "~~~" not in answer, answer
    stored = citations[0].text
    assert "********************" in stored and "=======" in stored and "```" in stored
