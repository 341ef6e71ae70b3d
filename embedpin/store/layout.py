"""The names inside a run folder ``runs/<id>/``: every file and folder name, and the functions
that build the relative paths of its numbered files. Code elsewhere names them through this
module, never by spelling them (``tests/test_config_store.py`` checks).

Layout::

    runs/NNNN-<slug>/
      config.toml            the RunConfig (everything needed to reproduce the run)
      inputs.json            the SHA-256 of every input file (targets, masks, guide and init images, an
                             init embedding): --resume refuses a run whose inputs changed
      state.json             status, committed generation count, pinned result, history, optimizer
      pinned.safetensors     the pinned conditioning + its recipe (metadata)
      inversion.safetensors  the token vectors textual inversion fitted before the search (its start)
      analysis.json          embedpin analyze's token table (embedpin.analysis), shown by the report
      index.html, report/    the run page and its plots, thumbnails and GIF (embedpin.reports)
      targets/target_TT.png  targets/mask_TT.png (its --mask, at the render size)  targets/guide_GG.png
      validation/plain_iBB.png
      generations/NNNN/      generation.json, images/cII_iBB.png, validation/, errmaps/iBB.png,
                             index.html, report/

Paths stored in records are relative and use ``/``: a candidate's images relative to its
generation folder, validation renders relative to the run (:func:`in_generation`).
"""

from __future__ import annotations

import re

CONFIG = "config.toml"
INPUTS = "inputs.json"
STATE = "state.json"
PINNED = "pinned.safetensors"
INVERSION = "inversion.safetensors"  # the token vectors the gradient stage fitted (the search's start)
ANALYSIS = "analysis.json"  # embedpin analyze's token table (embedpin.analysis), read by the report
GENERATION = "generation.json"  # a generation's record, in its folder
PAGE = "index.html"  # a report page: the run's, and one in each generation folder
ASSETS = "report"  # beside each page: its plots, thumbnails and frames

GENERATIONS = "generations"
TARGETS = "targets"
VALIDATION = "validation"
IMAGES = "images"
ERRMAPS = "errmaps"

RUN_NUMBER = re.compile(r"^(\d{4,})-")  # a run folder's name starts with its number: 0007-a-red-star


def run_dirname(number: int, prompt: str) -> str:
    """``(7, "A red star!") -> "0007-a-red-star"``: a run folder's name (the prompt's first 40
    characters as lowercase words joined by ``-``; "run" when none are left)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-") or "run"
    return f"{number:04d}-{slug}"


def generation_dirname(generation: int) -> str:
    """``3 -> "0003"``: the folder name of a generation inside ``generations/``."""
    return f"{generation:04d}"


def generation_path(generation: int) -> str:
    """``3 -> "generations/0003"``: a generation's folder, relative to the run."""
    return f"{GENERATIONS}/{generation_dirname(generation)}"


def in_generation(generation: int, rel: str) -> str:
    """``(3, "images/c00_i00.png") -> "generations/0003/images/c00_i00.png"``: a path relative to
    a generation folder made relative to the run."""
    return f"{generation_path(generation)}/{rel}"


def target_file(i: int, kind: str = "target") -> str:
    """``targets/target_TT.png`` (``kind`` "mask": target TT's mask ``targets/mask_TT.png``; "guide":
    ``targets/guide_GG.png``), relative to the run."""
    return f"{TARGETS}/{kind}_{i:02d}.png"


def candidate_image(i: int, b: int) -> str:
    """Image b of candidate i, relative to its generation folder."""
    return f"{IMAGES}/c{i:02d}_i{b:02d}.png"


def validation_image(kind: str, b: int) -> str:
    """Validation render b of ``kind`` (best / mean / plain), relative to its folder."""
    return f"{VALIDATION}/{kind}_i{b:02d}.png"


def errmap_image(b: int) -> str:
    """The best candidate's ꟻLIP error map of image b, relative to its generation folder."""
    return f"{ERRMAPS}/i{b:02d}.png"
