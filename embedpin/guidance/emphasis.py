"""Prompt emphasis as AUTOMATIC1111 writes it, parsed into weighted fragments.

The syntax (A1111's "attention/emphasis", which ComfyUI and most SD front ends read too):

- ``(words)`` multiplies the weight of what is inside by 1.1, ``((words))`` by 1.1², and so on;
- ``[words]`` divides it by 1.1;
- ``(words:1.3)`` multiplies it by the written number instead;
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters;
- ``BREAK`` (a word of its own, in capitals) ends the current 75-token chunk.

Malformed input is not an error; it is read as A1111 reads it: a closing bracket with no
opening one is text, a ``:`` that is not ``:number)`` is text, and a bracket left open at the
end applies to everything after it. Nesting multiplies. Adjacent fragments of equal weight
are merged.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = -1.0  # the weight that marks a BREAK fragment
_TOKEN = re.compile(r"""
      \\[()\[\]\\]               # an escaped bracket or backslash
    | \\                         # a lone backslash (dropped)
    | [(\[]                      # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)     # an explicit weight closing a round bracket
    | [)\]]                      # a closing bracket
    | [^\\()\[\]:]+              # plain text
    | :                          # a colon that closes nothing
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _number(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` -> [(text, weight)] in order; a BREAK is ``("BREAK", BREAK)``. A prompt with
    no text gives ``[("", 1.0)]``."""
    out: list[list] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for frag in out[start:]:
            if frag[1] != BREAK:
                frag[1] *= factor

    for m in _TOKEN.finditer(prompt):
        tok, weight = m.group(0), _number(m.group(1))
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok in opened:
            opened[tok].append(len(out))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), weight)
        elif tok == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif tok == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append(["BREAK", BREAK])
                out.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    return _merged(out)


def _merged(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in fragments:
        if weight != BREAK and not text:
            continue
        if merged and weight != BREAK and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]
