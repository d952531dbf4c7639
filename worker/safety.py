"""The safety filter: terms from a word list, found in a user's text and in the model's reply.

``SAFETY_WORDS_FILE`` lists one term a line (blank lines and ``#`` comments are
skipped). pyahocorasick's automaton finds every listed term in one pass over a
text, whatever the length of the list. A job whose text holds a term gets no
generated reply (and no conversation turn), and a reply that holds one is
replaced; either way the record's ``flagged`` says which terms were found (and,
for the user's text, where: spans of the text as written), and the reply is
``SAFETY_MESSAGE``. A partial reply, or a reply cut by its limit,
its deadline or a cancel, is shown without the end that could be the start of a
term, and not at all once it holds one.

Terms and texts are compared after the same folding, so spelling tricks do not
pass: compatibility forms (full-width letters) are unified (NFKC) and case is
folded; invisible format characters (zero-width spaces and joiners, soft
hyphens) are dropped; Cyrillic and Greek letters that look like Latin ones are
read as those; whitespace between Chinese characters is dropped; traditional
Chinese is read as simplified (OpenCC's ``t2s``).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import ahocorasick
import opencc

#: Cyrillic and Greek letters (after case folding) that look like Latin ones.
LOOK_ALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "с": "c", "ѕ": "s", "т": "t", "у": "y", "х": "x",
    "ԁ": "d", "ԝ": "w", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
})
_TRADITIONAL_TO_SIMPLIFIED = opencc.OpenCC("t2s")


def _is_chinese(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def fold(text: str) -> tuple[str, list[int]]:
    """``text`` as the filter compares it, and for each of its characters the index in ``text`` it
    came from (so a cut in the folded text is a cut in the original)."""
    simplified = _TRADITIONAL_TO_SIMPLIFIED.convert(text)
    if len(simplified) == len(text):
        sources = list(enumerate(simplified))
    else:  # a phrase changed length: convert character by character, keeping where each came from
        sources = [(i, out) for i, ch in enumerate(text) for out in (_TRADITIONAL_TO_SIMPLIFIED.convert(ch) or ch)]
    chars: list[str] = []
    origins: list[int] = []
    for index, ch in sources:
        if unicodedata.category(ch) == "Cf":  # zero-width spaces and joiners, soft hyphens, BOMs
            continue
        for out in unicodedata.normalize("NFKC", ch).casefold().translate(LOOK_ALIKES):
            chars.append(out)
            origins.append(index)
    keep = _without_spaces_between_chinese(chars)
    return "".join(chars[i] for i in keep), [origins[i] for i in keep]


def _without_spaces_between_chinese(chars: list[str]) -> list[int]:
    """Indices of ``chars`` to keep: all but whitespace runs with a Chinese character on each side."""
    keep, run = [], []
    for i, ch in enumerate(chars):
        if ch.isspace():
            run.append(i)
            continue
        if run and not (keep and _is_chinese(chars[keep[-1]]) and _is_chinese(ch)):
            keep.extend(run)
        run = []
        keep.append(i)
    return keep + run


class SafetyFilter:
    def __init__(self, terms: list[str]):
        self._automaton = ahocorasick.Automaton()
        for term in dict.fromkeys(t.strip() for t in terms):
            folded = fold(term)[0] if term else ""
            if folded:
                self._automaton.add_word(folded, term)
        #: term -> the length of its folded form, where a match of it starts.
        self._lengths = {term: len(fold(term)[0]) for term in self._automaton.values()}
        self.longest = max(self._lengths.values(), default=0)
        if self.longest:
            self._automaton.make_automaton()

    @classmethod
    def from_file(cls, path: str) -> SafetyFilter:
        """The terms of ``path``; raises OSError or UnicodeDecodeError for a file that cannot be read."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if not line.lstrip().startswith("#")])

    def find(self, text: str) -> list[str]:
        """The listed terms in ``text``, each once, in the order they first end in it."""
        return list(dict.fromkeys(term for term, _, _ in self.spans(text)))

    def spans(self, text: str) -> list[tuple[str, int, int]]:
        """Every match as (listed term, start, end): where it stands in ``text`` itself, as written
        (``text[start:end]``, full-width letters, invisible characters and spaces included)."""
        if not self.longest:
            return []
        folded, origins = fold(text)
        return [(term, origins[end - self._lengths[term] + 1], origins[end] + 1)
                for end, term in self._automaton.iter(folded)]

    def safe_prefix(self, partial: str) -> str | None:
        """What of a reply may be shown: None once it holds a term, else all but its longest end that
        could be the start of a term."""
        if not self.longest:
            return partial
        folded, origins = fold(partial)
        if any(True for _ in self._automaton.iter(folded)):
            return None
        for size in range(min(self.longest - 1, len(folded)), 0, -1):
            if self._automaton.match(folded[-size:]):  # a listed term starts with this end
                return partial[: origins[len(folded) - size]]
        return partial
