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
        path = self["config"] or DEFAULT_CONFIG
        if not Path(path).is_file():
            raise usage.UsageError(f"config file not found: {path}")
        self["config"] = path


def makeService(options: Options) -> Any:
    """Load and check the config, then build the service; a config error is one line on
    stderr and exit status 1, before anything listens or writes a pid file."""
    from pop3coexist.config import load_config
    from pop3coexist.service import make_service, preflight

    try:
        config = load_config(options["config"])
        preflight(config)
        return make_service(config)
    except ConfigError as e:
        raise SystemExit(f"pop3coexist: configuration error: {e}")
