"""The config reader (config.py parse_config) against generated TOML that is valid TOML and
sets declared keys (README "Configuration") to generated values of every TOML type, including
the arrays of tables: any such file either loads into a Config or raises the documented
ConfigError, which names the file and a ``[section.key]`` (with its line when the key is
written in the file); never another exception."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3coexist.config import Config, declared_arrays, declared_keys, parse_config
from pop3coexist.errors import ConfigError

pytestmark = pytest.mark.timeout(600)

KEYS = [name for name, _ in declared_keys()]
ARRAYS = sorted(declared_arrays(), key=len, reverse=True)
PATH = Path("/nonexistent/fuzz/pop3coexist.toml")

meaningful = st.sampled_from([
    "", "10MB", "1GiB", "0", "-1", "30s", "15m", "2d", "1w", "tcp:0", "tcp:2525:interface=127.0.0.1",
    "ssl:0", "unix:sock", "unix:/tmp/x", "../x", "/dev/null", "0.0.0.0/0", "::/0", "192.0.2.0/24",
    "*.x.test", "pop.contoso.test", "a@b.test", "@", "[127.0.0.1]:25", "[::1]:2525", "host:99999",
    "ldap://127.0.0.1:389", "ldaps://x", "(uid=%s)", "(&(", "%s@%d", "PLAIN", "CRAM-MD5",
    "directory", "passwordfile", "local", "mailbox", "gateway", "normalize", "reject", "10%",
    "1MB", "x" * 300, "\u00e9", "\x00", "\\",
])
scalars = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.booleans(), meaningful, st.text(max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["domain", "cost", "name", "x"]),
                                            inner, max_size=3)),
    max_leaves=8,
)


def toml_value(v) -> str:
    """TOML for a generated value (written here, apart from config.toml_value)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"


def render(settings: dict[str, object]) -> str:
    """A TOML file with [server] filled in and the generated keys, each in its table (an
    array of tables gets one entry)."""
    tables: dict[str, dict[str, object]] = {"server": {"hostname": "pop.contoso.test",
                                                       "state_dir": "var"}}
    for dotted, value in settings.items():
        section, _, key = dotted.rpartition(".")
        tables.setdefault(section, {})[key] = value
    out = []
    for section, keys in tables.items():
        array = any(section == a for a in ARRAYS)
        out.append(f"[[{section}]]" if array else f"[{section}]" if section else "")
        out.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
    return "\n".join(out) + "\n"


@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=4))
def test_any_typed_settings_load_or_name_the_key(settings: dict[str, object]) -> None:
    """Generated values for declared keys give a Config or a ConfigError naming file and key."""
    text = render(settings)
    try:
        cfg = parse_config(text, PATH)
    except ConfigError as e:
        message = str(e)
        m = re.match(re.escape(str(PATH)) + r"(:(\d+))?: (.*)", message, re.S)
        assert m, message
        assert m.group(3).startswith(("[", "not valid TOML")), message
        if m.group(2):
            assert 1 <= int(m.group(2)) <= len(text.splitlines()), message
        return
    assert isinstance(cfg, Config)
