"""The Maildir maildrop over files that other programs left, with any file name (spaces,
non-ASCII, undecodable octets, Unicode digits, flags after ``:2,``, very long) and any content:
every message gets a UIDL of 1-70 printable ASCII characters (RFC 1939 section 7), unique in
the maildrop, and a size that is exactly the canonical length RETR sends; nothing raises."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3coexist.store.maildir import MaildirStore
from tests.fuzz import oracles

pytestmark = pytest.mark.timeout(600)

HOST = "pop.contoso.test"

name_chars = st.sampled_from(list("0123456789abcXYZ.-_:,=+ ~") + ["\u0663", "\u00e9", "\udcff", "M", "P", "S", "W", "2"])
names = st.one_of(
    st.lists(name_chars, min_size=1, max_size=40).map("".join),
    st.sampled_from(["1700000000.M1P1Q1.host:2,S", "1700000000.M1P1.host,S=3:2,", "x" * 250,
                     "\u0663\u0663.M\u0663.x", "a b c", "1.M2", "99999999999999999999.M1.x"]),
).filter(lambda n: not n.startswith(".") and not re.search(r",[SW]=", n))
contents = st.binary(max_size=60)


@given(st.lists(st.tuples(names, contents), max_size=6, unique_by=lambda t: t[0]))
def test_any_file_names_give_valid_uidls_and_true_sizes(files) -> None:
    """UIDLs valid and unique, sizes equal to what RETR sends, for any names and contents."""
    tmp = Path(tempfile.mkdtemp(prefix="maildrop-fuzz-"))
    try:
        store = MaildirStore(tmp / "mailroot", hostname="mx.test")
        store.add_domain(HOST)
        store.add_mailbox(HOST, "ted")
        new = os.fsencode(tmp / "mailroot" / HOST / "ted" / "new")
        for name, data in files:
            with open(os.path.join(new, os.fsencode(name)), "wb") as f:
                f.write(data)
        drop = store.open_maildrop(HOST, "ted")
        try:
            assert len(drop) == len(files)
            uids = [drop.uidl(i) for i in range(len(drop))]
            for uid in uids:
                assert re.fullmatch(r"[\x21-\x7e]{1,70}", uid), uid
            assert len(set(uids)) == len(uids), uids
            sent = []
            for i in range(len(drop)):
                with drop.open_message(i) as f:
                    canon = oracles.canonical(f.read())
                assert drop.size(i) == len(canon), (i, drop.size(i), len(canon))
                sent.append(canon)
            assert Counter(sent) == Counter(oracles.canonical(d) for _, d in files)
            drop.commit(set())
        finally:
            drop.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
