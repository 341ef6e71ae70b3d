"""The run store ``runs/<id>/``: one run folder, its names, files and records.

==================  ====================================================================
module              holds
==================  ====================================================================
``layout``          every file and folder name of a run folder (the layout, in its
                    docstring) and the relative paths of its numbered files:
                    ``STATE``, ``CONFIG``, ``PINNED``, ``GENERATIONS``, ...,
                    ``generation_dirname``, ``in_generation``, ``target_file``,
                    ``candidate_image``, ``validation_image``, ``errmap_image``
``files``           atomic writes (``write_bytes``, ``write_text``, ``write_json``), JSON and
                    safetensors IO (``read_json``, ``write_vectors``, ``read_vectors``), image
                    encoding and the preview policy (``save_png``, ``save_image``,
                    ``save_figure``, ``save_render``, ``keeps_previews``, ``to_uint8``),
                    ``file_digest``
``records``         the JSON records: ``CandidateRecord``, ``GenerationRecord``,
                    ``HistoryEntry``, ``PinnedRecord``, ``FileRecord``, ``PlainValidation``,
                    ``InversionRecord``, ``StartRecord``, ``TokenRow``, ``TokenAnalysis``, ``RunState``
``folder``          ``RunStore``, the one object that reads and writes a run folder
                    (``create``, ``open`` to write; ``load_run`` to read), ``read_analysis``
==================  ====================================================================

Every name below is importable from ``embedpin.store`` itself.
"""

from embedpin.store.files import (
    FULL_AREA,
    PREVIEW,
    PREVIEW_QUALITY,
    PREVIEW_SIDE,
    file_digest,
    keeps_previews,
    read_json,
    read_vectors,
    save_figure,
    save_image,
    save_png,
    save_preview,
    save_render,
    to_uint8,
    write_bytes,
    write_json,
    write_text,
    write_vectors,
)
from embedpin.store.folder import RunStore, load_run, read_analysis
from embedpin.store.layout import (
    ANALYSIS,
    ASSETS,
    CONFIG,
    ERRMAPS,
    GENERATION,
    GENERATIONS,
    IMAGES,
    INPUTS,
    INVERSION,
    PAGE,
    PINNED,
    STATE,
    TARGETS,
    VALIDATION,
    candidate_image,
    errmap_image,
    generation_dirname,
    generation_path,
    in_generation,
    run_dirname,
    target_file,
    validation_image,
)
from embedpin.store.records import (
    STATE_VERSION,
    STATUSES,
    CandidateRecord,
    FileRecord,
    GenerationRecord,
    HistoryEntry,
    InversionRecord,
    PinnedRecord,
    PlainValidation,
    Record,
    RunState,
    StartRecord,
    TokenAnalysis,
    TokenRow,
)

__all__ = [
    "ANALYSIS", "ASSETS", "CONFIG", "ERRMAPS", "FULL_AREA", "GENERATION", "GENERATIONS", "IMAGES", "INPUTS",
    "INVERSION", "PAGE", "PINNED", "PREVIEW", "PREVIEW_QUALITY", "PREVIEW_SIDE", "STATE", "STATE_VERSION",
    "STATUSES", "TARGETS", "VALIDATION", "CandidateRecord", "FileRecord", "GenerationRecord", "HistoryEntry",
    "InversionRecord", "PinnedRecord", "PlainValidation", "Record", "RunState", "RunStore", "StartRecord", "TokenAnalysis",
    "TokenRow", "candidate_image", "errmap_image", "file_digest", "generation_dirname", "generation_path",
    "in_generation", "keeps_previews", "load_run", "read_analysis", "read_json", "read_vectors", "run_dirname",
    "save_figure", "save_image", "save_png", "save_preview", "save_render", "target_file", "to_uint8",
    "validation_image", "write_bytes", "write_json", "write_text", "write_vectors",
]
