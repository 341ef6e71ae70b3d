"""The CLIP tokenizers of the shipped model families (``models/families/``), from one copy of
CLIP's byte-pair vocabulary (``families/clip_bpe/``) and each family's special tokens.

``python -m embedpin.models.tokenizers BPE_GZ OUT_FOLDER`` rebuilds ``vocab.json`` and
``merges.txt`` from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (see ``families/NOTICE.md``).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from embedpin.models.micro.tokenizer import BOS, EOS, bytes_to_unicode

BPE_DIR = Path(__file__).parent / "families" / "clip_bpe"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, the same with </w>, the merges, two specials


def clip_tokenizer(config_file: Path):
    """A ``CLIPTokenizer`` of the shipped vocabulary with the special tokens of ``config_file``
    (a ``tokenizer_config.json``: SD 1.x pads with ``<|endoftext|>``, SD 2.x / SDXL's second
    encoder with ``!``)."""
    from transformers import CLIPTokenizer

    config = json.loads(Path(config_file).read_text())
    keep = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")
    return CLIPTokenizer(vocab=str(BPE_DIR / "vocab.json"), merges=str(BPE_DIR / "merges.txt"),
                         **{k: config[k] for k in keep if k in config})


def build_clip_bpe(bpe_gz: str | Path, out: str | Path) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` in ``out`` from CLIP's BPE file, in the layout
    transformers' ``CLIPTokenizer`` reads (as CLIP's ``simple_tokenizer`` orders the vocabulary)."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:MERGES + 1]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=2, sort_keys=True, ensure_ascii=False)
                     + "\n", encoding="utf-8")
    merges_file = folder / "merges.txt"
    merges_file.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return vocab, merges_file


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m embedpin.models.tokenizers bpe_simple_vocab_16e6.txt.gz OUT_FOLDER")
    for path in build_clip_bpe(sys.argv[1], sys.argv[2]):
        print(f"wrote {path}")
