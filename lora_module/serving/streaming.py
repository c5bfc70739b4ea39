"""Text deltas of one generating row, for streamed chat completions: only text the row's final answer keeps.

    deltas = TextDeltas(tokenizer, stop=("\\n\\n",))
    deltas.update([412, 9, 77])      # called each step with the row's new token ids: text safe to send now
    deltas.finish(output.text)       # the row's final `Output.text` minus what was sent

The final text (`predictor._decode_row`) is the decoded tokens, stripped, cut before the first stop
string. A delta never contains text that this later removes: leading whitespace is dropped; trailing
whitespace and an incomplete UTF-8 character ("\\ufffd") wait for what follows; a tail as long as the
longest stop string minus one waits (it may be a stop string's start); text from a stop string on is
never sent; and the last token's text waits for the next one (decoding a token can change the text
before it: `clean_up_tokenization_spaces` turns "do n" + "'t" into "don't"). So the deltas joined
with `finish` equal the final text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


class TextDeltas:
    """What one row has streamed so far, and the next piece it may stream (module docstring)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.sent = ""

    def update(self, ids: Sequence[int]) -> str:
        """The text to send after `ids` (the row's generated token ids so far); "" when none is safe."""
        safe = self.safe_text(list(ids))
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def safe_text(self, ids: list[int]) -> str:
        """The longest text of `ids` that every continuation's final text starts with."""
        whole = self.tokenizer.decode(ids, skip_special_tokens=True)
        before = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        text = os.path.commonprefix([whole, before]).lstrip()
        ends = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return trim_end(text[: max(0, min([len(text) - self.hold, *ends]))])

    def finish(self, text: str) -> str:
        """The rest of the final `text` after what was sent ("" and a warning if that is not its start)."""
        if not text.startswith(self.sent):
            logger.warning("streamed text %r is not the start of the final text %r", self.sent, text)
            return ""
        rest, self.sent = text[len(self.sent) :], text
        return rest


def trim_end(text: str) -> str:
    """`text` without trailing whitespace and incomplete characters ("\\ufffd")."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd"):
        end -= 1
    return text[:end]
