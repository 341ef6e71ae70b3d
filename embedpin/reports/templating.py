"""The jinja2 environment of the report: autoescape on, strict undefined, a few filters.

The page script is one static file whose SHA-256 goes into each page's
Content-Security-Policy, so the browser runs that script and no other (an injected
``<script>`` would be blocked even if it ever got past escaping).
"""

from __future__ import annotations

import base64
import hashlib
import math
from functools import lru_cache
from importlib import resources
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup


def num(value, digits: int = 4) -> str:
    """A float for a table cell: 4 significant digits, scientific when tiny or huge, '–' for none."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def sort_key(value) -> str:
    """The ``data-v`` attribute the table sorter reads: a number, or 'Infinity' for none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return repr(value)
    return "Infinity"


def href(path: str) -> str:
    """A relative file path as a URL path (percent-encoded, so it can never be a scheme)."""
    return quote(str(path), safe="/")


@lru_cache(maxsize=1)
def script() -> tuple[Markup, str]:
    """The page script and its CSP source expression ``'sha256-…'``."""
    text = resources.files("embedpin.reports").joinpath("templates/report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return Markup(text), f"'sha256-{digest}'"


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The shared, autoescaping environment over ``embedpin/reports/templates``."""
    env = Environment(
        loader=PackageLoader("embedpin.reports", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(num=num, sort_key=sort_key, href=href)
    return env


def render(template: str, **context) -> str:
    """Render one page template with the page script and its CSP hash."""
    text, digest = script()
    return environment().get_template(template).render(script=text, script_hash=digest, **context)
