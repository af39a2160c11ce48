"""startup.limit_malloc_retention: with it, 40 scrypt hashes (a log-in's, 16 MiB each) run in
10 threads leave the process RSS where it was; without it glibc keeps them in per-thread arenas
(the cause of most of the RSS growth with 1,000 IMAP log-ins, bench/imap_fetch.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
if sys.argv[1] == "on":
    from pop3coexist.startup import limit_malloc_retention
    assert limit_malloc_retention()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
with ThreadPoolExecutor(10) as ex:
    list(ex.map(lambda i: hashlib.scrypt(b"pw", salt=os.urandom(16), n=16384, r=8, p=1,
                                         dklen=32), range(40)))
    print((rss() - before) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_scrypt_in_threads_does_not_stay_in_rss() -> None:
    """RSS growth after 40 threaded scrypt hashes is under 24 MiB with the fix."""
    grown = int(subprocess.run([sys.executable, "-c", SCRIPT, "on"], capture_output=True,
                               text=True, check=True, timeout=120).stdout)
    assert grown < 24, grown
