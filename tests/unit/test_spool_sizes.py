"""The sizes a spool file's writer counts in memory (``SpoolWriter.known_sizes``) and the
store's delivery that takes them (``MaildirStore.deliver_sized``, ``ISizedDelivery``): the same
``,S=`` / ``,W=`` names as a delivery that reads the file, and the same refusals (issue 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pop3coexist import errors
from pop3coexist.canonical import canonical_size
from pop3coexist.smtp.incoming import WRITE_CHUNK, SpoolWriter, deliver_local, new_queue_id
from pop3coexist.store.maildir import MaildirStore

HOST = "pop.contoso.test"


def store_with(tmp_path: Path, *boxes: str) -> MaildirStore:
    store = MaildirStore(tmp_path / "mail", hostname="test")
    store.add_domain(HOST)
    for box in boxes:
        store.add_mailbox(HOST, box)
    return store


def finished(store: MaildirStore, *parts: bytes) -> SpoolWriter:
    spool = SpoolWriter(store.spool_dir(), new_queue_id(), lazy=True)
    spool.write_local_prefix(b"Return-Path: <a@b.example>\n")
    for part in parts:
        spool.write(part)
    spool.finish()
    return spool


def names(store: MaildirStore, box: str) -> list[str]:
    return sorted(os.listdir(store.root / HOST / box / "new"))


def test_known_sizes_are_the_files_sizes(tmp_path: Path) -> None:
    """A message that was all in memory at ``finish`` knows its size on disk and its POP3 size
    (canonical form: CRLF line ends), exactly what the store would have read from the file."""
    store = store_with(tmp_path)
    spool = finished(store, b"Subject: x\n\n", b"body\n.dot\n")
    data = spool.path.read_bytes()
    assert spool.known_sizes() == (len(data), canonical_size((data,)))


def test_sizes_unknown_for_a_big_message_or_after_an_edit_on_disk(tmp_path: Path) -> None:
    """A message already streamed to the file before ``finish`` (bigger than one chunk), or
    edited on disk afterwards, gives no sizes: the store reads the file as before."""
    store = store_with(tmp_path)
    big = finished(store, b"Subject: big\n\n", (b"x" * 100 + b"\n") * (WRITE_CHUNK // 50))
    assert big.known_sizes() is None
    small = finished(store, b"Subject: small\n\nbody\n")
    assert small.known_sizes() is not None
    small.replace(b"Subject: edited\n\nnew body\n")
    assert small.known_sizes() is None


def test_delivery_with_known_sizes_names_the_file_as_a_read_would(tmp_path: Path) -> None:
    """``deliver_local`` with counted sizes links the spool file under the same ``,S=,W=``
    name that ``deliver_within_quota`` gives after reading the file."""
    store = store_with(tmp_path, "ann", "bob")
    counted = finished(store, b"Subject: x\n\nline\n")
    counted.close()
    written, refused = deliver_local(store, counted, [(HOST, "ann")], others=False)
    assert refused == [] and len(written) == 1
    read = SpoolWriter(store.spool_dir(), "Q2")  # not lazy: created at once, sizes unknown
    read.write_local_prefix(b"Return-Path: <a@b.example>\n")
    read.write(b"Subject: x\n\nline\n")
    read.finish()
    assert read.known_sizes() is None
    deliver_local(store, read, [(HOST, "bob")], others=False)
    size_part = [n.split(",", 1)[1] for n in names(store, "ann") + names(store, "bob")]
    assert size_part[0] == size_part[1]
    assert size_part[0] == f"S={counted.size},W={counted.wsize}"


def test_delivery_with_known_sizes_to_a_vanished_mailbox_stores_nothing(tmp_path: Path) -> None:
    """A mailbox removed between RCPT and the commit: ``NoSuchMailbox`` names it, and the
    link already made into the other mailbox is removed again (everywhere or nowhere)."""
    store = store_with(tmp_path, "ann", "gone")
    spool = finished(store, b"Subject: x\n\nline\n")
    store.remove_mailbox(HOST, "gone")
    with pytest.raises(errors.NoSuchMailbox, match="gone"):
        store.deliver_sized(spool.path, [(HOST, "ann"), (HOST, "gone")], *spool.known_sizes())
    assert names(store, "ann") == []


def test_delivery_with_known_sizes_keeps_the_quota(tmp_path: Path) -> None:
    """The quota is checked on the counted size: a full mailbox is refused, the other one
    gets the message."""
    store = store_with(tmp_path, "ann", "full")
    store.set_quota(HOST, "full", 10)
    spool = finished(store, b"Subject: x\n\nline\n")
    written, refused = store.deliver_sized(spool.path, [(HOST, "ann"), (HOST, "full")],
                                           *spool.known_sizes())
    assert refused == [(HOST, "full")] and len(written) == 1 and len(names(store, "ann")) == 1
