"""Vocabulary words ranked by CLIP for target images (as CLIP Interrogator ranks words).

Every whole-word token of the tokenizer's vocabulary (a BPE token that ends a word and
is made of letters) is embedded by the CLIP text tower on its own; words are ranked by
the cosine similarity of that embedding with the mean CLIP image embedding of the
targets (Radford et al. 2021: the zero-shot classifier's score). Placeholder tokens
started at the top words begin the search with what CLIP sees in the target and the
prompt does not say.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from embedpin.models.clip import clip_image_embeds, require_clip

WORD_END = "</w>"
CHUNK = 512  # words per CLIP text forward pass


def vocabulary_words(tokenizer) -> list[str]:
    """Whole-word tokens of a CLIP BPE vocabulary (letters only, >= 2 of them), sorted."""
    words = {t[: -len(WORD_END)] for t in tokenizer.get_vocab() if t.endswith(WORD_END)}
    return sorted(w for w in words if len(w) >= 2 and w.isalpha() and w.isascii())


@torch.no_grad()
def word_embeds(components, words: list[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings [len(words), Dp] of each word alone (float32)."""
    clip = require_clip(components)
    p = next(clip.parameters())
    out = []
    for i in range(0, len(words), CHUNK):
        tok = components.tokenizer(words[i:i + CHUNK], padding=True, return_tensors="pt")
        pooled = clip.text_model(input_ids=tok.input_ids.to(p.device),
                                 attention_mask=tok.attention_mask.to(p.device)).pooler_output
        out.append(clip.text_projection(pooled).float())
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def rank_words(components, images: torch.Tensor, exclude: Iterable[str] = (), n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` vocabulary words CLIP ranks highest for images [T, 3, H, W] in [0, 1]:
    [(word, cosine)], best first; words in ``exclude`` (e.g. the prompt's) are left out."""
    skip = {w.lower() for w in exclude}
    words = [w for w in vocabulary_words(components.tokenizer) if w.lower() not in skip]
    if not words:
        return []
    target = F.normalize(clip_image_embeds(components, images).mean(0), dim=-1)
    embeds = word_embeds(components, words)
    scores = embeds @ target.to(embeds.device)
    top = scores.topk(min(n, len(words)))
    return [(words[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
