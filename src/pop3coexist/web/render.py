"""Page rendering: jinja2 templates with automatic HTML escaping, and the static files.

``Renderer(*template_dirs)`` looks a template up in the given folders first, then in the
core's ``templates/`` (which holds ``base.html``, the page frame every front-end extends, and
the error pages). Autoescaping is on for every template whatever its name
(``autoescape=True``): every ``{{ value }}`` is HTML-escaped unless a template says
``|safe`` (none does with user data). Undefined names are errors (``StrictUndefined``), so a
typo fails the page test instead of rendering empty.

The shared stylesheet ``static/style.css`` (responsive: one column on a phone, usable at 360
px wide; no inline styles anywhere, so the CSP keeps ``style-src 'self'``) and any other file
of a ``static/`` folder are served by ``static_file(name)``: fixed names only, no paths.
"""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

import jinja2

HERE = Path(__file__).parent
CORE_TEMPLATES = HERE / "templates"
CORE_STATIC = HERE / "static"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(css|png|svg|ico|txt)$")


class Renderer:
    """Renders named templates to UTF-8 bytes (see the module docstring)."""

    def __init__(self, *template_dirs: Path, static_dirs: tuple[Path, ...] = (),
                 globals: dict[str, Any] | None = None) -> None:
        loader = jinja2.FileSystemLoader([str(d) for d in (*template_dirs, CORE_TEMPLATES)])
        self.env = jinja2.Environment(loader=loader, autoescape=True,
                                      undefined=jinja2.StrictUndefined,
                                      trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(globals or {})
        self.static_dirs = (*static_dirs, CORE_STATIC)

    def render(self, template: str, /, **context: Any) -> bytes:
        """The template named ``template`` rendered with ``context``, as UTF-8."""
        return self.env.get_template(template).render(**context).encode("utf-8")

    def static_file(self, name: str) -> tuple[bytes, str] | None:
        """(content, media type) of a static file by its bare name, or None (unknown, or a
        name with a path or odd characters)."""
        if not _STATIC_NAME.match(name):
            return None
        for folder in self.static_dirs:
            p = folder / name
            if p.is_file():
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                if kind.startswith("text/"):
                    kind += "; charset=utf-8"
                return p.read_bytes(), kind
        return None
