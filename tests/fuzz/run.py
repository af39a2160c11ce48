"""Run one fuzz harness under atheris (coverage-guided, libFuzzer), or replay files through it.

    python -m tests.fuzz.run NAME [libFuzzer options] [CORPUS_DIR ...]
    python -m tests.fuzz.run NAME --replay FILE_OR_DIR ...

NAME is a key of ``tests.fuzz.harnesses.HARNESSES``. The libFuzzer options are the usual
ones (``-runs=N``, ``-max_total_time=S``, ``-seed=N``, ``-artifact_prefix=DIR/``); the first
corpus folder receives new inputs, so pass a scratch folder first and the seed corpus
(``tests/fuzz/corpus/NAME``) after it. The pop3coexist modules the harness judges are
instrumented for coverage (``MODULES``; for the harnesses of ``ONLY`` exactly those, see there);
an input that breaks an invariant is written as ``crash-*`` under ``-artifact_prefix`` and the
exit status is non-zero. libFuzzer's last line ``Done N runs in S second(s)`` gives the
number of inputs run (``make fuzz`` prints it per harness).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

MODULES = {
    "address": ["pop3coexist.address"],
    "smtp_params": ["pop3coexist.smtp.params", "pop3coexist.smtp.dsn"],
    "smtp_session": ["pop3coexist.smtp.server"],
    "smtp_data": ["pop3coexist.smtp.incoming"],
    "pop3_stream": ["pop3coexist.pop3.stream", "pop3coexist.canonical", "pop3coexist.store.maildir"],
    "pop3_session": ["pop3coexist.pop3.server", "pop3coexist.pop3.factory"],
    "dsn": ["pop3coexist.smtp.dsn"],
    "config": ["pop3coexist.config"],
    "ldapfilter": ["pop3coexist.ldapfilter"],
    "smtp_client": ["pop3coexist.smtp.client"],
    "sieve": ["pop3coexist.policy.sieve", "pop3coexist.policy.sieve_run"],
    "milter": ["pop3coexist.milter.codec"],
    "imap_parse": ["pop3coexist.imap.parse"],
    "imap_session": ["pop3coexist.imap.parse", "pop3coexist.imap.server", "pop3coexist.imap.fetch",
                     "pop3coexist.imap.message", "pop3coexist.imap.factory",
                     "pop3coexist.store.folders"],
}

# Harnesses instrumented in exactly these packages/modules (a name covers its submodules):
# atheris's ``include`` is by top-level package, so without this every pop3coexist module
# the listed ones import (config, identity, policy, address, ...) is instrumented too. The
# IMAP session runs the real server over the real store: its own code and the folder store
# it calls guide the fuzzer; the rest only costs time per input (every instrumented line
# and comparison is a call into atheris).
ONLY = {
    "imap_session": ("pop3coexist.imap", "pop3coexist.store.folders"),
}


def _instrumented_only(prefixes: tuple[str, ...]) -> list[str]:
    """Every pop3coexist module name outside ``prefixes`` (for atheris's ``exclude``), found
    from the source files, without importing them."""
    import importlib.util

    spec = importlib.util.find_spec("pop3coexist")
    root = Path(spec.origin).parent
    names = []
    for f in root.rglob("*.py"):
        parts = ["pop3coexist", *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if not any(name == p or name.startswith(p + ".") or p.startswith(name + ".")
                   for p in prefixes):
            names.append(name)
    return names


def _replay(name: str, paths: list[str]) -> int:
    from tests.fuzz.harnesses import HARNESSES

    fn = HARNESSES[name]
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    for f in files:
        fn(f.read_bytes())
    print(f"replayed {len(files)} inputs through {name}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    name = argv[1]
    if len(argv) > 2 and argv[2] == "--replay":
        return _replay(name, argv[3:])
    import atheris

    # only the modules the harness judges are instrumented (instrumenting costs seconds)
    exclude = _instrumented_only(ONLY[name]) if name in ONLY else None
    with atheris.instrument_imports(include=["pop3coexist"], exclude=exclude):
        for module in MODULES[name]:
            importlib.import_module(module)
    from tests.fuzz import harnesses

    atheris.Setup([argv[0], *argv[2:]], harnesses.HARNESSES[name])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
