"""Markup cleaning for the sentences the extractive generator quotes.

Stored text is often reStructuredText or Markdown (the Python docs, READMEs).
Split into sentences as it is, a heading and its underline become a "sentence"
(``The "with" statement ********************``) that ranks first because it is
short and on topic. Cleaning works on lines, before the sentence split, since an
underline or a fence is only recognisable as a line; the stored text itself is
never changed (citations show it as stored).

What is removed, and what becomes of the text:

- reST / Markdown setext headings (a one-line paragraph with an underline, with or
  without an overline) and Markdown ATX headings (``# Title``): the whole heading
  goes. A heading is a label, not a sentence; quoted, it crowds out the answer.
- Lines of nothing but markup (underlines, rules, table borders, ``***``): gone.
- Code fences (lines opening with `````` or ``~~~``): the fence lines go; the code
  inside stays only if the block reads as a sentence (ends with ``.``, ``!`` or
  ``?``), as a comment or a doctest's prose might; other code is never quoted.
- reST directives, targets and substitution definitions (``.. note::``,
  ``.. _label:``) and the ``:option:`` lines right after a directive: gone; the
  directive's body (the note's prose) stays.
- Inline markup keeps its words: ``**bold**`` -> ``bold``, ````literal```` ->
  ``literal``, ``:func:`len``` -> ``len``; list bullets and ``>`` quote markers go;
  a paragraph's closing ``::`` (reST literal block) reads ``:``.

Every removed line becomes a paragraph break, so the words on either side never
run together into one sentence.
"""

from __future__ import annotations

import re

# A line of one repeated punctuation character: a reST/setext underline or overline.
# Not backticks: a line of them is a Markdown fence.
_ADORNMENT = re.compile(r"^\s*([=\-~*^#+'\"_:.])\1{2,}\s*$")
_ATX_HEADING = re.compile(r"^\s{0,3}#{1,6}(\s|$)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+(\S+::|_[^:]*:|\|[^|]+\|)")
_DIRECTIVE_OPTION = re.compile(r"^\s*:[\w-]+:(\s|$)")
_BULLET = re.compile(r"^(\s*)(?:[-*+]|>+)\s+")
_BOLD = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_LITERAL = re.compile(r"``(\S(?:.*?\S)?)``")
_ROLE = re.compile(r":[\w.-]+(?::[\w.-]+)*:`([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL_BLOCK_MARKER = re.compile(r"(\S)::\s*$")
_SENTENCE_ENDING = re.compile(r"[.!?][\"')\]]*\s*$")


def clean_markup(text: str) -> str:
    """The text with headings, underlines, fences, directives and markup-only
    lines removed (each as a paragraph break) and inline markup reduced to its
    words; meant for choosing quotable sentences, never for storing."""
    lines = text.splitlines()
    kept: list[str] = []
    fence: str | None = None  # the opening marker while inside a fenced block
    code: list[str] = []
    after_directive = False
    for i, line in enumerate(lines):
        fence_match = _FENCE.match(line)
        if fence is None and i > 0 and _is_heading(lines, i - 1):
            kept.append("")  # an underline, though "~~~" could open a fence
            continue
        if fence is not None:
            if fence_match and fence_match.group(1)[0] == fence[0]:
                if len(fence_match.group(1)) >= len(fence):
                    kept.extend(["", *_code_if_sentence(code), ""])
                    fence, code = None, []
                continue
            code.append(line)
            continue
        if fence_match:
            fence = fence_match.group(1)
            continue
        if after_directive and _DIRECTIVE_OPTION.match(line):
            kept.append("")
            continue
        after_directive = bool(_DIRECTIVE.match(line))
        dropped = after_directive or _ATX_HEADING.match(line) or _has_no_words(line)
        if dropped or _is_heading(lines, i):
            kept.append("")
        else:
            kept.append(_clean_inline(line))
    if fence is not None:  # a chunk may end inside a fence
        kept.extend(["", *_code_if_sentence(code)])
    return "\n".join(kept)


def is_markup_only(sentence: str) -> bool:
    """True when the sentence has no letter in it: nothing there to quote."""
    return not any(c.isalpha() for c in sentence)


def _has_no_words(line: str) -> bool:
    # Rules, table borders, bare markup ("***", "+---+---+", "|", "----"): no
    # letter or digit, so nothing a sentence could be made of.
    return not any(c.isalnum() for c in line)


def _is_heading(lines: list[str], i: int) -> bool:
    # A one-line paragraph directly over an underline (reST, Markdown setext);
    # a longer paragraph over a rule is prose and keeps its words.
    if i + 1 >= len(lines) or _has_no_words(lines[i]):
        return False
    underline = _ADORNMENT.match(lines[i + 1])
    if not underline:
        return False
    # "~~~" also opens a Markdown fence: read it as an underline only where reST
    # would, as long as the title at least.
    if underline.group(1) == "~" and len(lines[i + 1].strip()) < len(lines[i].strip()):
        return False
    previous = lines[i - 1] if i > 0 else ""
    return not previous.strip() or bool(_ADORNMENT.match(previous))


def _code_if_sentence(code: list[str]) -> list[str]:
    text = " ".join(" ".join(code).split())
    return [text] if _SENTENCE_ENDING.search(text) else []


def _clean_inline(line: str) -> str:
    line = _BULLET.sub(r"\1", line)
    line = _ROLE.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _BOLD.sub(r"\1", line)
    return _LITERAL_BLOCK_MARKER.sub(r"\1:", line)
