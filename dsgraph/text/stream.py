"""Streaming text from token ids: pieces that never end inside a UTF-8 character, and stop strings matched on
the text across token boundaries.

A byte-level BPE token can hold part of a character (an emoji is 4 bytes, often 2-3 tokens); decoding such a
prefix gives U+FFFD. The detokeniser decodes a short window of tokens and emits the new text only when the
window no longer ends in U+FFFD, so the pieces joined equal one decode of every token. The window starts a
few tokens back, because some decoders (SentencePiece's Metaspace) drop a leading space when a token is
decoded alone.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """push(token id) -> the text that became certain; flush() -> whatever is left at the end."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, context=()):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = [int(i) for i in context][-4:]
        self.prefix = 0                  # first token of the window decoded for context
        self.read = len(self.ids)        # tokens whose text has been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the very end decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class TextStream:
    """Detokenised text with stop strings: `push` returns the text safe to show now. Text that could be the start
    of a stop string is held back until it is known not to be one; a matched stop string ends the stream and is
    not part of the text (OpenAI's and vLLM's convention)."""

    def __init__(self, tokenizer, stop=(), skip_special_tokens: bool = True, context=()):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, context)
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.text = ""
        self.stopped_on: str | None = None

    def _emit(self, new: str) -> str:
        if self.stopped_on is not None:
            return ""
        buf = self.pending + new
        hits = [(buf.find(s), s) for s in self.stop if s in buf]
        if hits:
            at, self.stopped_on = min(hits)
            out, self.pending = buf[:at], ""
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
            out, self.pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out

    def push(self, token_id: int) -> str:
        return self._emit(self.detok.push(token_id))

    def finish(self) -> str:
        """The rest at the end of generation (held-back text that turned out not to be a stop string)."""
        out = self._emit(self.detok.flush())
        rest, self.pending = ("", "") if self.stopped_on is not None else (self.pending, "")
        self.text += rest
        return out + rest
