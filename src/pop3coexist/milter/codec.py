"""The Sendmail milter wire protocol, version 6, as Postfix speaks it (no I/O).

A packet is a 32-bit big-endian length, then that many octets: one command (or reply) byte and
its data. Strings are NUL-terminated; numbers are 32-bit (or 16-bit for the port) big-endian.
The constants below are libmilter's (``include/libmilter/mfdef.h``); the packet shapes are the
ones Postfix's ``src/milter/milter8.c`` sends and reads (see also draft-adams-milter-protocol).

``encode(command, data)`` builds one packet; ``Decoder`` splits a byte stream into
``(code, data)`` packets; ``parse_reply(code, data)`` turns a filter's packet into a ``Reply``.
A malformed packet raises ``ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

VERSION = 6  # SMFI_PROT_VERSION
MAX_PACKET = 1 << 20  # octets a filter may send in one packet (its replies are small)
CHUNK = 65535  # MILTER_CHUNK_SIZE: body octets per SMFIC_BODY

# -- commands, MTA -> filter (SMFIC_*)
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# -- replies, filter -> MTA (SMFIR_*)
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

# -- actions a filter may ask for (SMFIF_*)
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
ACTIONS_OFFERED = (F_ADDHDRS | F_CHGBODY | F_ADDRCPT | F_DELRCPT | F_CHGHDRS | F_QUARANTINE
                   | F_ADDRCPT_PAR | F_SETSYMLIST)  # not CHGFROM: the sender never changes

# -- protocol steps a filter may leave out or not answer (SMFIP_*)
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
PROTOCOL_OFFERED = (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS
                    | P_NOEOH | P_NR_HDR | P_NOUNKNOWN | P_NODATA | P_SKIP | P_NR_CONN
                    | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH
                    | P_NR_BODY | P_HDR_LEADSPC)  # not RCPT_REJ: refused RCPTs are not sent

# the step a "no reply" flag belongs to, by command
NO_REPLY = {CONNECT: P_NR_CONN, HELO: P_NR_HELO, MAIL: P_NR_MAIL, RCPT: P_NR_RCPT,
            DATA: P_NR_DATA, HEADER: P_NR_HDR, EOH: P_NR_EOH, BODY: P_NR_BODY,
            UNKNOWN: P_NR_UNKN}
# the step a "do not send" flag belongs to, by command
NO_SEND = {CONNECT: P_NOCONNECT, HELO: P_NOHELO, MAIL: P_NOMAIL, RCPT: P_NORCPT,
           DATA: P_NODATA, HEADER: P_NOHDRS, EOH: P_NOEOH, BODY: P_NOBODY,
           UNKNOWN: P_NOUNKNOWN}

# -- macro stages of SMFIR_SETSYMLIST (SMFIM_*), and the command each goes with
MACRO_STAGES = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}

# address families of SMFIC_CONNECT
FAMILY_UNKNOWN = b"U"
FAMILY_UNIX = b"L"
FAMILY_INET = b"4"
FAMILY_INET6 = b"6"


class ProtocolError(Exception):
    """A filter sent something the protocol does not allow (the conversation with it ends)."""


def encode(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + command + data


def cstrings(*items: str | bytes) -> bytes:
    """NUL-terminated strings, joined (str as UTF-8, undecodable octets kept)."""
    out = []
    for item in items:
        raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
        out.append(raw.replace(b"\0", b"") + b"\0")
    return b"".join(out)


def optneg(version: int = VERSION, actions: int = ACTIONS_OFFERED,
           protocol: int = PROTOCOL_OFFERED) -> bytes:
    """SMFIC_OPTNEG: the version, the actions and the steps the MTA offers."""
    return encode(OPTNEG, struct.pack("!III", version, actions, protocol))


def connect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    """SMFIC_CONNECT: the client's name, address family, port and address (RFC-less: the
    shape is ``hostname NUL family port(16) address NUL``; UNKNOWN has no port or address)."""
    if family == FAMILY_UNKNOWN:
        return encode(CONNECT, cstrings(hostname) + family)
    return encode(CONNECT, cstrings(hostname) + family + struct.pack("!H", port)
                  + cstrings(address))


def macros(stage: bytes, values: dict[str, str]) -> bytes:
    """SMFIC_MACRO for the command ``stage``: name NUL value NUL pairs (empty values left
    out, as Postfix does)."""
    items: list[str] = []
    for name, value in values.items():
        if value:
            items += [name, value]
    return encode(MACRO, stage + cstrings(*items))


def parse_optneg(data: bytes) -> tuple[int, int, int]:
    """A filter's SMFIC_OPTNEG reply: (version, actions, protocol flags)."""
    if len(data) < 12:
        raise ProtocolError(f"option negotiation reply of {len(data)} octets (12 expected)")
    return struct.unpack("!III", data[:12])


@dataclass
class Reply:
    """One packet from a filter, parsed. ``code`` is the reply byte; ``args`` its strings;
    ``index`` the number of SMFIR_CHGHEADER / SMFIR_INSHEADER (the stage of
    SMFIR_SETSYMLIST); ``body`` the chunk of SMFIR_REPLBODY (or of the OPTNEG reply)."""

    code: bytes
    args: list[str] = field(default_factory=list)
    index: int = 0
    body: bytes = b""


def _split(data: bytes, want: int | None = None) -> list[str]:
    if data and not data.endswith(b"\0"):
        raise ProtocolError("a string without its NUL terminator")
    parts = data[:-1].split(b"\0") if data else []
    if want is not None and len(parts) < want:
        raise ProtocolError(f"{want} strings expected, {len(parts)} received")
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def parse_reply(code: bytes, data: bytes) -> Reply:
    """The filter packet ``code`` + ``data`` as a Reply; ProtocolError when malformed or unknown."""
    if code in (ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, PROGRESS, CONN_FAIL,
                SHUTDOWN):
        return Reply(code)
    if code == REPLYCODE:
        (text,) = _split(data, 1)[:1]
        if len(text) < 3 or not (text[:3].isascii() and text[:3].isdigit()) or text[0] not in "45":
            raise ProtocolError(f"reply code {text[:40]!r} is not a 4xx or 5xx SMTP reply")
        return Reply(code, [text])
    if code in (ADDRCPT, DELRCPT, QUARANTINE):
        return Reply(code, _split(data, 1)[:1])
    if code == ADDRCPT_PAR:
        parts = _split(data, 1)
        return Reply(code, parts[:2])
    if code == CHGFROM:
        return Reply(code, _split(data, 1)[:2])
    if code == ADDHEADER:
        return Reply(code, _split(data, 2)[:2])
    if code in (CHGHEADER, INSHEADER):
        if len(data) < 4:
            raise ProtocolError("header change without its index")
        (index,) = struct.unpack("!I", data[:4])
        return Reply(code, _split(data[4:], 2)[:2], index=index)
    if code == REPLBODY:
        return Reply(code, body=data)
    if code == SETSYMLIST:
        if len(data) < 4:
            raise ProtocolError("macro list without its stage")
        (where,) = struct.unpack("!I", data[:4])
        return Reply(code, _split(data[4:], 1)[:1], index=where)
    raise ProtocolError(f"unknown reply {code!r}")


class Decoder:
    """Splits a byte stream from a filter into ``(code, data)`` packets."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The whole packets now available; ProtocolError on a length of 0 or over MAX_PACKET."""
        self._buf += data
        out: list[tuple[bytes, bytes]] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack("!I", self._buf[:4])
            if length == 0 or length > MAX_PACKET:
                raise ProtocolError(f"packet length {length}")
            if len(self._buf) < 4 + length:
                break
            packet = self._buf[4:4 + length]
            self._buf = self._buf[4 + length:]
            out.append((packet[:1], packet[1:]))
        return out
