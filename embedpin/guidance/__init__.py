"""Guidance: encode prompts and images, map CLIP image tokens onto prompts (FlexDiffuse),
and the embedding-delta search spaces; one batched call builds all candidates' conditionings.

Typical use: ``ctx = make_context(components, prompt, guide=path)``, ``ctx.blocks(names)``
for the search space, then ``build(ctx, params)`` per generation and ``distance(ctx, cond)``.
"""

from embedpin.guidance.blocks import BLOCK_NAMES
from embedpin.guidance.build import Conditioning, build, candidate_vectors, distance
from embedpin.guidance.context import GuidanceContext, GuidanceOptions, make_context
from embedpin.guidance.encode import PromptEncoding, encode_image, encode_prompt, encode_text_from_embeds
from embedpin.guidance.mapping import Mapping, map_image_tokens

__all__ = [
    "BLOCK_NAMES", "Conditioning", "GuidanceContext", "GuidanceOptions", "Mapping", "PromptEncoding", "build",
    "candidate_vectors", "distance", "encode_image", "encode_prompt", "encode_text_from_embeds", "make_context",
    "map_image_tokens",
]
