"""The safety filter: terms from a word list, found in a user's text and in the model's reply.

``SAFETY_WORDS_FILE`` lists one term a line (blank lines and ``#`` comments are
skipped). pyahocorasick's automaton finds every listed term in one pass over a
text, whatever the length of the list. Matching ignores case. A job whose text
holds a term gets no generated reply, and a reply that holds one is replaced;
either way the record's ``flagged`` says which terms were found, and the
reply is ``SAFETY_MESSAGE``. Partial replies are written without their last
``longest term - 1`` characters, and not at all once they hold a term, so
streaming never shows a flagged term, nor the start of one.
"""

from __future__ import annotations

from pathlib import Path

import ahocorasick


class SafetyFilter:
    def __init__(self, terms: list[str]):
        self._automaton = ahocorasick.Automaton()
        for term in dict.fromkeys(t.strip() for t in terms):
            if term:
                self._automaton.add_word(term.casefold(), term)
        self.longest = max((len(t.casefold()) for t in self._automaton.values()), default=0)
        if self.longest:
            self._automaton.make_automaton()

    @classmethod
    def from_file(cls, path: str) -> SafetyFilter:
        """The terms of ``path``; raises OSError or UnicodeDecodeError for a file that cannot be read."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([line for line in lines if not line.lstrip().startswith("#")])

    def find(self, text: str) -> list[str]:
        """The listed terms in ``text``, each once, in the order they first end in it."""
        if not self.longest:
            return []
        return list(dict.fromkeys(term for _, term in self._automaton.iter(text.casefold())))

    def safe_prefix(self, partial: str) -> str | None:
        """What of a growing reply may be shown now: None once it holds a term, else all but its
        last ``longest - 1`` characters (they could be the start of a term)."""
        if self.find(partial):
            return None
        return partial[: max(0, len(partial) - (self.longest - 1))] if self.longest else partial
