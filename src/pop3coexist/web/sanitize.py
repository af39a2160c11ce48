"""HTML mail made safe to show: nh3 (the Python binding of Ammonia, a whitelist sanitiser
built on html5ever, the HTML parser of Servo) with a mail-reading policy.

What survives ``clean_html``: Ammonia's default tags (text structure, tables, lists, links,
images) plus ``font`` and ``u``; attributes from Ammonia's default list plus ``style``
(filtered to typography, colour and box properties: no ``background``, ``position``,
``content`` or anything that takes a ``url()``), ``color``/``face``/``size`` on ``font``,
``bgcolor`` and ``width`` on table parts. Everything else goes, with its content for
``script``, ``style``, ``title``, ``noscript``, ``template``, ``iframe``, ``object``,
``embed``, ``svg`` and ``math``: no script, no event handler (``on*``), no ``<form>``,
``<input>``, ``<iframe>``, ``<meta>`` (refresh), ``<base>``, ``<link>``, no ``javascript:``,
``vbscript:`` or ``data:`` links (links keep http, https and mailto, and get
``rel="noopener noreferrer"`` and ``target="_blank"``).

Images: ``src`` keeps ``cid:`` references (turned into this message's part URL by
``cid_url``) and, only when the user asked to see images (``remote_images=True``),
``http:``/``https:`` URLs. Otherwise a remote ``src`` is removed and counted
(``Cleaned.blocked``), so the page can offer "show images". A ``data:`` image is kept only for
``image/png``, ``gif``, ``jpeg`` and ``webp``.

The result is shown inside a sandboxed frame served with its own CSP (web mail: ``sandbox
allow-popups allow-popups-to-escape-sandbox; default-src 'none'; style-src 'unsafe-inline';
img-src`` data:/self, plus http: https: only after "show images"): even a sanitiser bug could
run no script and load no remote resource (defence in depth).
"""

from __future__ import annotations

import html as html_module
import re
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import nh3

TAGS = set(nh3.ALLOWED_TAGS) | {"font", "u", "center"}
CLEAN_CONTENT = {"script", "style", "title", "noscript", "template", "iframe", "object",
                 "embed", "svg", "math", "head", "textarea", "select", "button", "applet",
                 "frameset", "noframes", "xmp", "noembed"}
ATTRIBUTES: dict[str, set[str]] = deepcopy(nh3.ALLOWED_ATTRIBUTES)
for _tag in TAGS:
    ATTRIBUTES.setdefault(_tag, set()).update({"style", "dir", "lang", "title"})
ATTRIBUTES["font"].update({"color", "face", "size"})
for _tag in ("table", "td", "th", "tr", "tbody", "thead"):
    ATTRIBUTES[_tag].update({"bgcolor", "width", "height", "valign", "border", "cellpadding",
                             "cellspacing"})
ATTRIBUTES["a"] = {"href", "hreflang", "title"}
STYLE_PROPERTIES = {
    "color", "font", "font-family", "font-size", "font-style", "font-weight", "line-height",
    "text-align", "text-decoration", "text-indent", "text-transform", "letter-spacing",
    "white-space", "vertical-align", "margin", "margin-top", "margin-bottom", "margin-left",
    "margin-right", "padding", "padding-top", "padding-bottom", "padding-left",
    "padding-right", "border", "border-top", "border-bottom", "border-left", "border-right",
    "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
    "width", "max-width", "min-width", "height", "display", "list-style-type",
    "background-color",
}
LINK_SCHEMES = {"http", "https", "mailto"}
_SAFE_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]+$", re.I)


@dataclass
class Cleaned:
    """The sanitised HTML and how many remote images it had blocked."""

    html: str
    blocked: int = 0


MAX_NESTING = 256  # open elements at once (estimated) before HTML is shown as text
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]{0,30})\b[^>]*?(/?)>")
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr", "keygen", "basefont", "bgsound", "frame", "image"}
_OPTIONAL_END = {"p", "li", "dt", "dd", "tr", "td", "th", "tbody", "thead", "tfoot", "option",
                 "optgroup", "colgroup", "caption", "rb", "rt", "rp", "rtc", "html", "head",
                 "body"}


def too_deep(html: str, limit: int = MAX_NESTING) -> bool:
    """True when ``html`` nests more than ``limit`` elements (estimated from its tags: void
    elements and those whose end tag is optional do not count). html5ever's tree building is
    quadratic in the nesting of block elements (10,000 nested ``<div>`` cost 3 s, 100,000
    minutes: a 600 KB message could hold a server thread that long)."""
    depth = 0
    for m in _TAG.finditer(html):
        name = m.group(2).lower()
        if name in _VOID or name in _OPTIONAL_END or m.group(3):
            continue
        if m.group(1):
            depth = max(depth - 1, 0)
        else:
            depth += 1
            if depth > limit:
                return True
    return False


def _plain_text(html: str) -> str:
    """The text of ``html`` without an HTML parser (tags cut out, entities decoded)."""
    return html_module.unescape(re.sub(r"<[^>]*>", " ", html))


def clean_html(html: str, remote_images: bool = False,
               cid_url: Callable[[str], str | None] | None = None) -> Cleaned:
    """Sanitise a message's HTML part (see the module docstring). ``cid_url(content_id)``
    gives the URL of an inline part, or None when the message has no such part. HTML nested
    deeper than MAX_NESTING (``too_deep``) is not parsed: its text is shown, escaped, in a
    ``<pre>``."""
    if too_deep(html):
        return Cleaned("<pre>" + html_module.escape(_plain_text(html)) + "</pre>")
    blocked = 0

    def attribute_filter(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if tag == "img" and attr == "src":
            v = value.strip()
            low = v.lower()
            if low.startswith("cid:"):
                return cid_url(v[4:].strip("<>")) if cid_url is not None else None
            if low.startswith(("http:", "https:", "//")):
                if remote_images and not low.startswith("//"):
                    return v
                blocked += 1
                return None
            if _SAFE_DATA_IMAGE.match(v):
                return v
            return None
        if "url(" in value.lower() or "expression(" in value.lower():
            return None
        return value

    out = nh3.clean(
        html, tags=TAGS, clean_content_tags=CLEAN_CONTENT, attributes=ATTRIBUTES,
        attribute_filter=attribute_filter, strip_comments=True,
        link_rel="noopener noreferrer", url_schemes=LINK_SCHEMES | {"data", "cid"},
        set_tag_attribute_values={"a": {"target": "_blank"}},
        filter_style_properties=STYLE_PROPERTIES)
    # url_schemes must admit data: and cid: for <img>; links with them are dropped here
    out = re.sub(r'(<a\b[^>]*?)\shref="(?:data|cid):[^"]*"', r"\1", out, flags=re.I)
    return Cleaned(out, blocked)


def frame_csp(remote_images: bool) -> str:
    """The Content-Security-Policy of a message body frame."""
    img = "'self' data: http: https:" if remote_images else "'self' data:"
    return ("sandbox allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
            f"img-src {img}; style-src 'unsafe-inline'; font-src 'none'; "
            "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")


_BREAKS = re.compile(r"<\s*(br|/p|/div|/tr|/li|/h[1-6]|/blockquote|/table)\b[^>]*>", re.I)


def html_text(html: str) -> str:
    """The text of an HTML part (a reply's quote of a message without text/plain): tags and
    their script/style content removed, entities decoded, block ends as line breaks."""
    if too_deep(html):
        text = html_module.escape(_plain_text(_BREAKS.sub("\n", html)))
    else:
        text = nh3.clean(_BREAKS.sub("\n", html), tags=set(),
                         clean_content_tags=CLEAN_CONTENT, strip_comments=True)
    lines = [" ".join(ln.split()) for ln in html_module.unescape(text).splitlines()]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()
