"""Prompts of any length, as A1111 and ComfyUI tokenize them: 75-token chunks.

A CLIP text encoder sees 77 positions: BOS, 75 tokens, EOS (padded). A longer prompt is cut
into chunks of 75 tokens (a ``BREAK`` ends a chunk early), each chunk gets its own BOS / EOS
/ padding and is encoded on its own, and the chunks' states are concatenated along the
sequence ([1, 77 c, D]; diffusers takes ``prompt_embeds`` of any length). A prompt of at
most 75 tokens is one chunk, token for token what ``tokenizer(prompt, padding="max_length",
max_length=77, truncation=True)`` gives. Emphasis (:mod:`embedpin.guidance.emphasis`) gives
every token its written weight; the brackets are not tokens. Placeholder tokens (token
vectors) follow the prompt's last token, as ``"<prompt> <pin>"`` would be written, and spill
into a new chunk when the last one is full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedpin.errors import ModelError
from embedpin.guidance.emphasis import BREAK, parse_emphasis


@dataclass
class Tokens:
    """A tokenized prompt.

    ids [1, L] (L = 77 c for c chunks; SDXL: ids_2 from the second tokenizer); positions [n]:
    the sequence positions of the prompt's tokens and then the placeholders', in order;
    weights [n]: their written emphasis (1 for placeholders); placeholders [N]: the
    placeholders' positions; strings: the L token strings (placeholders ``<vI>``); window:
    positions per chunk (77); headers: each chunk's BOS position.
    """

    ids: torch.Tensor
    ids_2: torch.Tensor | None
    positions: torch.Tensor
    weights: torch.Tensor
    placeholders: torch.Tensor
    strings: list[str]
    window: int

    @property
    def chunks(self) -> int:
        return self.ids.shape[1] // self.window


def token_label(token: str) -> str:
    """A token string as a person reads it: CLIP's word-end mark dropped (``"star</w>"`` ->
    ``"star"``), a piece that does not end a word marked with a trailing ``-`` (``"sta-"``)."""
    if token.endswith("</w>"):
        return token[:-4]
    return token if token.startswith("<") and token.endswith(">") else f"{token}-"


def _fragment_ids(tokenizer, prompt: str) -> list[tuple[list[int], float]]:
    """(token ids, weight) per emphasis fragment; a BREAK is ``([], BREAK)``."""
    return [([], w) if w == BREAK else (tokenizer(text, add_special_tokens=False).input_ids, w)
            for text, w in parse_emphasis(prompt)]


def _chunked(fragments: list[tuple[list[int], float]], n_placeholders: int, body: int,
             first: bool = False) -> list[list[tuple[int, float]]]:
    """Token rows (id, weight; placeholder j's id is -1 - j) cut into chunks of at most ``body``
    tokens, a BREAK ending one early; at least one (possibly empty) chunk. The placeholders
    follow the prompt, or with ``first`` precede it."""
    chunks: list[list[tuple[int, float]]] = [[]]
    rows = [(i, w) for ids, w in fragments for i in (ids if w != BREAK else [None])]
    pins = [(-1 - j, 1.0) for j in range(n_placeholders)]
    for i, w in ([*pins, *rows] if first else [*rows, *pins]):
        if (i is None and chunks[-1]) or len(chunks[-1]) == body:
            chunks.append([])
        if i is not None:
            chunks[-1].append((i, w))
    return [c for c in chunks if c] or [[]]


def _ids(tokenizer, chunks: list[list[tuple[int, float]]], window: int, n_chunks: int) -> list[int]:
    """Each chunk as BOS + ids + EOS + padding (placeholders: new ids after the vocabulary,
    as a textual-inversion loader adds them), padded with empty chunks to ``n_chunks``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for chunk in [*chunks, *([[]] * (n_chunks - len(chunks)))]:
        ids = [i if i >= 0 else len(tokenizer) - 1 - i for i, _ in chunk]
        out += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * (window - 2 - len(ids))
    return out


def _omit(fragments: list[tuple[list[int], float]], k: int | None) -> list[tuple[list[int], float]]:
    """The fragments without the prompt's ``k``-th token (None: all of them; token analysis)."""
    if k is None:
        return fragments
    out, seen = [], 0
    for ids, w in fragments:
        out.append(([i for j, i in enumerate(ids) if seen + j != k], w))
        seen += len(ids)
    if not 0 <= k < seen:
        raise ValueError(f"the prompt has {seen} tokens, cannot leave out token {k}")
    return out


def chunk_count(components, prompt: str, n_placeholders: int = 0) -> int:
    """How many chunks ``prompt`` (with ``n_placeholders`` beside it) takes."""
    tok = components.tokenizer
    return len(_chunked(_fragment_ids(tok, prompt), n_placeholders, int(tok.model_max_length) - 2))


def tokenize(components, prompt: str, n_placeholders: int = 0, chunks: int | None = None,
             omit: int | None = None, first: bool = False) -> Tokens:
    """``prompt`` (A1111 emphasis syntax) and ``n_placeholders`` placeholders after it (``first``:
    before it, ``"<pin> <prompt>"``) -> :class:`Tokens` of at least ``chunks`` chunks (more if the
    prompt needs them); ``omit``: leave the prompt's token of that index out (as if it had not
    been written). ``positions`` and ``weights`` list the prompt's tokens first, then the
    placeholders, wherever they stand."""
    tok = components.tokenizer
    window = int(tok.model_max_length)
    fragments = _omit(_fragment_ids(tok, prompt), omit)
    rows = _chunked(fragments, n_placeholders, window - 2, first)
    n_chunks = max(len(rows), chunks or 1)
    ids_2 = None
    if components.is_sdxl:
        second = _omit(_fragment_ids(components.tokenizer_2, prompt), omit)
        if [len(i) for i, _ in second] != [len(i) for i, _ in fragments]:
            raise ModelError("the two SDXL tokenizers split this prompt into different tokens")
        ids_2 = _ids(components.tokenizer_2, _chunked(second, n_placeholders, window - 2, first), window, n_chunks)
    placed = sorted(((c * window + 1 + k, item) for c, chunk in enumerate(rows) for k, item in enumerate(chunk)),
                    key=lambda row: row[1][0] < 0)  # the prompt's tokens, then the placeholders (stable)
    positions, flat = [p for p, _ in placed], [item for _, item in placed]
    ids = _ids(tok, rows, window, n_chunks)
    strings = tok.convert_ids_to_tokens([i if i < len(tok) else tok.pad_token_id or 0 for i in ids])
    for p, (i, _) in zip(positions, flat):
        if i < 0:
            strings[p] = f"<v{-1 - i}>"
    dev = components.text_encoder.device
    as_row = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    return Tokens(ids=as_row(ids), ids_2=None if ids_2 is None else as_row(ids_2),
                  positions=torch.tensor(positions, dtype=torch.long, device=dev),
                  weights=torch.tensor([w for _, w in flat], device=dev),
                  placeholders=torch.tensor([p for p, (i, _) in zip(positions, flat) if i < 0], dtype=torch.long,
                                            device=dev),
                  strings=strings, window=window)
