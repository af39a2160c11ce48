"""twistd options and service maker for ``twistd pop3coexist --config FILE``.

The config is loaded and checked in ``Options.postOptions``, so any error (unknown key, bad
value, unwritable mailroot, corrupt password file, bad TLS files) is reported by twistd as one
clear line and the server does not start: nothing is half-started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.python import usage

from pop3coexist.errors import ConfigError

DEFAULT_CONFIG = "etc/pop3coexist.toml"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the pop3coexist mail server (POP3, ESMTP, outbound delivery). "
        f"Without --config, {DEFAULT_CONFIG} in the current folder is used."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file (default: etc/pop3coexist.toml)."],
    ]

    def postOptions(self) -> None:
        from pop3coexist.config import load_config
        from pop3coexist.service import preflight

        path = self["config"] or DEFAULT_CONFIG
        if not Path(path).is_file():
            raise usage.UsageError(f"config file not found: {path}")
        try:
            self.loaded = load_config(path)
            preflight(self.loaded)
        except ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options: Options) -> Any:
    from pop3coexist.service import make_service

    try:
        return make_service(options.loaded)
    except ConfigError as e:
        raise SystemExit(f"pop3coexist: {e}")
