"""Stop strings in text that grows a token at a time.

Both decode loops use this one matcher, so a stop string is found (and the text cut) at the
same place whether it is asked of ``runtime.generate`` or the server. Only the new tail is
scanned, reaching back far enough to catch a stop string that spans the last token boundary.
"""

from __future__ import annotations


class StopStrings:
    """Finds stop strings in growing text and says how much text is safe to send already.

    When streaming, the last ``longest - 1`` characters are held back: they might be the start
    of a stop string, which must never reach the client.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def find(self, text: str, new_from: int) -> int:
        """Start of the earliest stop string that ends after ``new_from``, or -1."""
        if not self.stop:
            return -1
        start = max(0, new_from - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits, default=-1)

    def safe(self, text: str) -> int:
        """How many characters of ``text`` can be sent now."""
        return len(text) - self.hold if self.stop else len(text)
