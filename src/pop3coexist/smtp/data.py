"""DATA of an ESMTP session: the spool file with Return-Path and Received, the byte stream into
it (``incoming.MessageReader``: only CRLF.CRLF ends it), then the transaction's commit (the
declared stages of ``policy.stages``) and the reply, 250 only once the message is durable.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from pop3coexist.errors import StorageFull, disk_full
from pop3coexist.interfaces import IDeliveryTransaction
from pop3coexist.smtp.incoming import MessageReader, SpoolWriter, new_queue_id
from pop3coexist.smtp.mailevents import accepted_event
from pop3coexist.smtp.received import received_header, return_path_field, with_keyword
from pop3coexist.smtp.session import (
    STATE_COMMAND,
    STATE_DATA,
    fail,
    log,
    reply_for,
)


class DataCommands:
    """DATA and the end of the message (mixed into ESMTPServer)."""

    # ------------------------------------------------------------------ DATA

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            raise fail(501, "5.5.4", "Syntax: DATA")
        txn = self._txn
        if txn is None:
            raise fail(503, "5.5.1", "Need MAIL command first")
        if not txn.recipients:
            raise fail(554, "5.5.1", "No valid recipients")
        cfg = self.factory.config.smtp
        queue_id = new_queue_id()
        try:
            spool = SpoolWriter(self.factory.store.spool_dir(), queue_id, lazy=True)
        except OSError as e:
            log.error("SMTP: cannot create a spool file: {err}", err=e)
            if disk_full(e):
                raise StorageFull(str(e)) from None
            raise fail(451, "4.3.0", "Local error in processing, try again later")
        self._queue_id = queue_id
        self._arrival = time.time()
        if txn.local_delivery:
            # final delivery here: Return-Path first (RFC 5321 section 4.4); the copy for the
            # outbound queue leaves it out (incoming.enqueue_spool)
            spool.write_local_prefix(return_path_field(str(txn.sender) if txn.sender else ""))
        spool.write(
            received_header(
                helo=self._helo or "unknown",
                client_ip=self.client_ip,
                hostname=self.hostname,
                protocol=with_keyword(self._esmtp, self.secure, self.user is not None),
                queue_id=queue_id,
                recipient=txn.recipients[0] if len(txn.recipients) == 1 else None,
                tls=self._tls_info(),
                when=self._arrival,
            )
        )
        self._reader = MessageReader(
            spool, cfg.max_message_size, cfg.max_hop_count,
            allow_bare_lf=cfg.bare_newline == "normalize",
        )
        self._state = STATE_DATA
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")
        return None

    def _tls_info(self) -> str | None:
        if not self.secure:
            return None
        for obj in (self.transport, getattr(self.transport, "protocol", None)):
            conn = getattr(obj, "_tlsConnection", None)
            if conn is not None:
                try:
                    return f"{conn.get_protocol_version_name()}:{conn.get_cipher_name()}"
                except Exception:
                    return None
        return None

    def _pump_data(self) -> None:
        reader = self._reader
        assert reader is not None
        n = reader.feed(self._buf)
        if n is None:
            self._buf = b""
            return
        self._buf = self._buf[n:]
        self._state = STATE_COMMAND
        self._reader = None
        d = self._end_of_data(reader)
        if d is not None:
            self._wait(d)

    def _end_of_data(self, reader: MessageReader) -> defer.Deferred | None:
        txn = self._txn
        self._txn = None
        assert txn is not None
        queue_id = self._queue_id
        self._command_line = ("DATA", "", queue_id)  # refusals from here name the queue id
        if reader.error is not None:
            log.info("SMTP {id} refused: {reply}", id=queue_id, reply=reader.error.reply())
            txn.abort()
            self._error(reader.error)
            return None
        self._messages += 1
        txn.body(reader.sink, reader.size, reader.hops.count + 1, self._arrival,
                 f"{self._helo} ([{self.client_ip}])")
        # the declared stages after DATA (policy/stages.py), then the reply
        return txn.commit().addCallbacks(self._committed, self._not_committed,
                                         (txn, reader, queue_id))

    def _not_committed(self, failure: Failure) -> None:
        self._error(reply_for(failure))

    def _committed(self, _: Any, txn: IDeliveryTransaction, reader: MessageReader,
                   queue_id: str) -> None:
        log.info(
            "SMTP {id} accepted from {ip}: {size} octets, {n} recipients",
            id=queue_id, ip=self.client_ip, size=reader.size, n=len(txn.recipients),
            **accepted_event(self, txn, queue_id),
        )
        self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")

