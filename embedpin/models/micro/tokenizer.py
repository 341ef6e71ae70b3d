"""A CLIP-format BPE tokenizer (vocab.json + merges.txt) for the micro model's captions.

The base vocabulary is CLIP's: all 256 byte-level characters, alone and with the
end-of-word marker ``</w>``. Each caption word gets a chain of merges that builds it
from its characters, so known words are one token and an unknown word falls back to
smaller pieces (down to single characters) instead of failing.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges to ``symbols`` the way CLIP's BPE does (lowest rank first)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = symbols[i], symbols[i + 1]
        out, j = [], 0
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == a and symbols[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(symbols[j])
                j += 1
        symbols = out
    return symbols


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list under which every word in ``words`` is one token.

    Words are added one by one: the current merges are applied, then new merges (of
    lower priority than all earlier ones) join the remaining pieces left to right, so
    earlier words keep tokenizing exactly as before.
    """
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, sorted(ranks, key=ranks.get)


def save_tokenizer(words: list[str], folder: str | Path):
    """Write vocab.json, merges.txt and the tokenizer config; return a loaded ``CLIPTokenizer``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=77)
    tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))
