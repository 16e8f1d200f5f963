"""The text of each generated token, as the tokens arrive, and where token sequences first differ.

[`TokenPieces`] streams a pane's text at a small cost per token; [`token_pieces`] is the exact reference it ends
with; [`first_divergence`] is the position the page marks with ▼.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TokenPieces", "first_divergence", "token_pieces"]


def _piece(text: str, previous: str) -> str:
    """What `text` adds to `previous` (the text before the token): the new tail when `text` extends `previous`; when
    decoding the longer list rewrote the end (a multi-byte character completed), the part past `previous`'s length."""
    common = 0
    while common < min(len(text), len(previous)) and text[common] == previous[common]:
        common += 1
    return text[common:] if common == len(previous) else text[len(previous) :]


def token_pieces(tokenizer, tokens: Sequence[int]) -> list[str]:
    """The text each token adds (they concatenate to `decode(tokens, skip_special_tokens=True)`); special tokens
    (end of sequence...) as their own name, so the token view shows them.

    Decodes the growing prefix at every token (quadratic, but right for any tokenizer); [`TokenPieces`] gives the
    same pieces as the tokens arrive, decoding only a short window at each.

    Args:
        tokenizer: The tokenizer.
        tokens (`Sequence[int]`): Token ids.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces, previous = [], ""
    for i, token in enumerate(tokens):
        if token in special:
            pieces.append(tokenizer.convert_ids_to_tokens(int(token)))
            continue
        # Decoding the growing prefix keeps word-start spaces right; a token that ends inside a multi-byte
        # character shows nothing until the token that completes it.
        text = tokenizer.decode(list(tokens[: i + 1]), skip_special_tokens=True)
        if text.endswith("\ufffd") and i < len(tokens) - 1:
            pieces.append("")
            continue
        pieces.append(_piece(text, previous))
        previous = text
    return pieces


class TokenPieces:
    """[`token_pieces`] and the decoded text of a token list that grows one token at a time, at a small cost per
    token: each new token decodes only the tokens since the text last ended on a whole character (at most about
    `window` of them), not the whole prefix.

    That split is exact for byte-level tokenizers (GPT-2, Llama 3, Qwen, the demo's): their text is the UTF-8
    decoding of the tokens' bytes, so a prefix that ends on a whole character decodes on its own. Tokenizers that
    decode a window differently from the same tokens in context (SentencePiece drops a word-start space at the
    start of a text; clean-up rules join across the split) can stream slightly different interim text;
    [`TokenPieces.finish`] checks the pieces against one decode of all the tokens and, on any difference, takes
    [`token_pieces`] instead, so the final pieces and text are always exact.

    Args:
        tokenizer: The tokenizer.
        window (`int`, *optional*, defaults to 16): Tokens after which the decoded window restarts (when it ends
            on a whole character).
    """

    def __init__(self, tokenizer, window: int = 16) -> None:
        self.tokenizer = tokenizer
        self.window = window
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.text = ""
        self._window: list[int] = []
        self._previous = ""  # the window's text up to the last token that got its piece

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens.

        Args:
            tokens (`Sequence[int]`): Token ids.
        """
        for token in tokens:
            token = int(token)
            self.tokens.append(token)
            if token in self.special:
                self.pieces.append(self.tokenizer.convert_ids_to_tokens(token))
                continue
            self._window.append(token)
            text = self.tokenizer.decode(self._window, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                self.pieces.append("")  # inside a multi-byte character: shown with the token that completes it
                continue
            piece = _piece(text, self._previous)
            self.pieces.append(piece)
            self.text += piece
            self._previous = text
            if len(self._window) >= self.window:
                self._window, self._previous = [], ""

    def finish(self) -> None:
        """Make `pieces` and `text` exactly [`token_pieces`] and `decode(tokens, skip_special_tokens=True)`."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.tokens and self.tokens[-1] not in self.special and self.pieces[-1] == "":
            # The text ends inside a multi-byte character: the last token shows the replacement character.
            self.pieces[-1] = _piece(self.tokenizer.decode(self._window, skip_special_tokens=True), self._previous)
        kept = "".join(p for p, t in zip(self.pieces, self.tokens) if t not in self.special)
        if kept != text:
            self.pieces = token_pieces(self.tokenizer, self.tokens)
        self.text = text


def first_divergence(token_lists: Sequence[Sequence[int]]) -> int | None:
    """The first position where the sequences differ (one ending before another counts), or `None` when they are
    equal or fewer than two.

    Args:
        token_lists (`Sequence[Sequence[int]]`): Token id sequences.
    """
    if len(token_lists) < 2:
        return None
    longest = max(len(t) for t in token_lists)
    for i in range(longest):
        column = {tuple(t[i : i + 1]) for t in token_lists}
        if len(column) > 1:
            return i
    return None
