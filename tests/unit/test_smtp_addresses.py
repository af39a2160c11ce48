"""Byte-level ESMTP dialogues for issue 11 faults 1 and 2: postmaster (RFC 5321 4.5.1) and
abuse (RFC 2142) on every domain the server is authoritative for, and the whole RFC 5321
section 4.1.2 Mailbox in MAIL FROM and RCPT TO (quoted local parts, address literals), with the
relay decision following the parsed domain. Replies are written out here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.support.dialogue import run_dialogue, take
from tests.support.fakes import FakeMailStore
from tests.support.smtp_fakes import make_factory, open_session, smtp_config

HELLO = (b"EHLO client.test\r\n", lambda got: got.startswith(b"250-pop.contoso.test"))


def config(**domains):
    cfg = smtp_config()
    return replace(cfg, domains=replace(cfg.domains, **domains))


def fresh_store() -> FakeMailStore:
    """The store as a fresh install leaves it: ted and ann, and the postmaster mailbox the
    service creates at start (with no log-in: the checker does not know it)."""
    store = FakeMailStore()
    for box in ("ted", "ann", "postmaster"):
        store.add(f"{box}@pop.contoso.test")
    return store


def session(factory, peer: str = "203.0.113.5"):
    proto, t = open_session(factory, peer)
    take(t)
    return proto, t


def test_postmaster_on_a_fresh_install() -> None:
    """<Postmaster> (any case) and postmaster@ the local domain are accepted although no
    account is called postmaster, and the message lands in the postmaster mailbox."""
    factory, store, _, queue, _ = make_factory(store=fresh_store())
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<someone@example.org>\r\n", b"250 2.1.0 Sender <someone@example.org> OK\r\n"),
        (b"RCPT TO:<Postmaster>\r\n", b"250 2.1.5 Recipient <postmaster@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<postmaster@pop.contoso.test>\r\n",
         b"250 2.1.5 Recipient <postmaster@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<PostMaster@POP.Contoso.Test>\r\n",
         b"250 2.1.5 Recipient <PostMaster@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<\"postmaster\"@pop.contoso.test>\r\n",
         b"250 2.1.5 Recipient <postmaster@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<abuse@pop.contoso.test>\r\n",
         b"550 5.1.1 <abuse@pop.contoso.test>: no such user here\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("postmaster@pop.contoso.test")) == 1
    assert queue.items == []


def test_postmaster_of_a_domain_added_later_and_of_a_domain_with_its_own() -> None:
    """A domain added at run time (domain add) has a working postmaster too: it lands in the
    configured postmaster mailbox, unless that domain has a postmaster mailbox of its own."""
    store = fresh_store()
    store.add_domain("added.test")
    store.add("postmaster@own.test")
    factory, *_ = make_factory(store=store)
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Sender <> OK\r\n"),
        (b"RCPT TO:<postmaster@added.test>\r\n", b"250 2.1.5 Recipient <postmaster@added.test> OK\r\n"),
        (b"RCPT TO:<postmaster@own.test>\r\n", b"250 2.1.5 Recipient <postmaster@own.test> OK\r\n"),
        (b"RCPT TO:<nobody@added.test>\r\n", b"550 5.1.1 <nobody@added.test>: no such user here\r\n"),
        (b"RCPT TO:<postmaster@elsewhere.example>\r\n",
         b"554 5.7.1 Relay access denied for <postmaster@elsewhere.example>\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("postmaster@pop.contoso.test")) == 1
    assert len(store.messages("postmaster@own.test")) == 1


def test_postmaster_and_abuse_to_configured_addresses() -> None:
    """domains.postmaster names a remote address: postmaster mail is queued for it with the
    original recipient as ORCPT (no relay permission needed: the config chose it); domains.abuse
    names a local mailbox. (No postmaster mailbox was created: the default is not used.)"""
    store = FakeMailStore()
    for box in ("ted", "ann", "security"):
        store.add(f"{box}@pop.contoso.test")
    factory, store, _, queue, _ = make_factory(
        config(postmaster="hostmaster@corp.example", abuse="security@pop.contoso.test"), store=store)
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<postmaster>\r\n", b"250 2.1.5 Recipient <postmaster@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<ABUSE@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ABUSE@pop.contoso.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("security@pop.contoso.test")) == 1
    [(_, env)] = queue.items
    assert env["recipients"] == [{"address": "hostmaster@corp.example",
                                  "orcpt": "rfc822;postmaster@pop.contoso.test", "notify": None}]


def test_quoted_local_parts() -> None:
    """MAIL FROM with a quoted local part holding a space is accepted; a quoted dot-atom is the
    same mailbox; an unknown quoted user is 550 5.1.1 (never 501); '>' and spaces inside quotes
    do not end the path, and parameters after it still parse."""
    factory, store, _, queue, _ = make_factory()
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b'MAIL FROM:<"odd sender"@example.test> SIZE=100\r\n',
         b'250 2.1.0 Sender <"odd sender"@example.test> OK\r\n'),
        (b'RCPT TO:<"no such user"@pop.contoso.test>\r\n',
         b'550 5.1.1 <"no such user"@pop.contoso.test>: no such user here\r\n'),
        (b'RCPT TO:<"ted"@pop.contoso.test>\r\n', b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b'RCPT TO:<"a> b"@pop.contoso.test> NOTIFY=NEVER\r\n',
         b'550 5.1.1 <"a> b"@pop.contoso.test>: no such user here\r\n'),
        (b'RCPT TO:<"x\\"y"@pop.contoso.test>\r\n',
         b'550 5.1.1 <"x\\"y"@pop.contoso.test>: no such user here\r\n'),
        (b'RCPT TO:<"unterminated@pop.contoso.test>\r\n', b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (b'RCPT TO:<"a"b@pop.contoso.test>\r\n',
         b"501 5.1.3 Bad recipient address syntax: malformed quoted local part\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    [message] = store.messages("ted@pop.contoso.test")
    assert b"\tfor <ted@pop.contoso.test>;" in message


def test_quoted_sender_and_recipient_are_stored_quoted() -> None:
    """The queue envelope keeps the sender and a relayed recipient correctly quoted (what the
    outbound client sends back out, and DSNs name); Received 'for' names it quoted too."""
    factory, store, _, queue, _ = make_factory()
    proto, t = session(factory, peer="192.0.2.7")  # a trusted network: may relay
    run_dialogue(proto, [
        HELLO,
        (b'MAIL FROM:<"odd \\"sender\\""@example.test>\r\n',
         b'250 2.1.0 Sender <"odd \\"sender\\""@example.test> OK\r\n'),
        (b'RCPT TO:<"far away"@foreign.example>\r\n',
         b'250 2.1.5 Recipient <"far away"@foreign.example> OK\r\n'),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    [(data, env)] = queue.items
    assert env["sender"] == '"odd \\"sender\\""@example.test'
    assert env["recipients"][0]["address"] == '"far away"@foreign.example'
    assert b'\tfor <"far away"@foreign.example>;' in data


def test_quoting_never_opens_a_relay() -> None:
    """For an untrusted anonymous client the decision follows the parsed domain: a foreign
    domain behind a quoted local part is still foreign (554 5.7.1), and a foreign-looking quoted
    local part of a local domain is an unknown local user (550 5.1.1)."""
    factory, _, _, queue, _ = make_factory(resolve_host=lambda name: ["198.51.100.7"])
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b'RCPT TO:<"ted@pop.contoso.test"@foreign.example>\r\n',
         b'554 5.7.1 Relay access denied for <"ted@pop.contoso.test"@foreign.example>\r\n'),
        (b'RCPT TO:<"victim@foreign.example"@pop.contoso.test>\r\n',
         b'550 5.1.1 <"victim@foreign.example"@pop.contoso.test>: no such user here\r\n'),
        (b'RCPT TO:<"victim%foreign.example"@pop.contoso.test>\r\n',
         b'550 5.1.1 <victim%foreign.example@pop.contoso.test>: no such user here\r\n'),
        (b'RCPT TO:<"@foreign.example:victim"@pop.contoso.test>\r\n',
         b'550 5.1.1 <"@foreign.example:victim"@pop.contoso.test>: no such user here\r\n'),
        (b"RCPT TO:<victim@[192.0.2.99]>\r\n", b"554 5.7.1 Relay access denied for <victim@[192.0.2.99]>\r\n"),
        (b"RCPT TO:<victim@[IPv6:2001:db8::99]>\r\n",
         b"554 5.7.1 Relay access denied for <victim@[IPv6:2001:db8::99]>\r\n"),
        (b"RCPT TO:<postmaster@[192.0.2.99]>\r\n",
         b"554 5.7.1 Relay access denied for <postmaster@[192.0.2.99]>\r\n"),
        (b"DATA\r\n", b"554 5.5.1 No valid recipients\r\n"),
    ], transport=t)
    assert queue.items == []


def test_address_literals_of_this_host_are_local() -> None:
    """RFC 1123 5.2.17: a literal for loopback, for the address the client connected to, or for
    an address of server.hostname (looked up through the injected resolver) is the primary
    local domain; an IPv4 literal also in IPv6 and IPv4-mapped forms."""
    store = fresh_store()
    factory, store, _, _, _ = make_factory(store=store, resolve_host=lambda name: ["198.51.100.7"])
    proto, t = session(factory)  # the transport's own address is 127.0.0.1:25
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@[192.0.2.1]>\r\n", b"250 2.1.0 Sender <a@[192.0.2.1]> OK\r\n"),
        (b"RCPT TO:<ted@[127.0.0.1]>\r\n", b"250 2.1.5 Recipient <ted@[127.0.0.1]> OK\r\n"),
        (b"RCPT TO:<ann@[IPv6:::1]>\r\n", b"250 2.1.5 Recipient <ann@[IPv6:::1]> OK\r\n"),
        (b"RCPT TO:<Postmaster@[198.51.100.7]>\r\n",
         b"250 2.1.5 Recipient <Postmaster@[198.51.100.7]> OK\r\n"),
        (b"RCPT TO:<\"ted\"@[IPv6:::ffff:198.51.100.7]>\r\n",
         b"250 2.1.5 Recipient <ted@[IPv6:::ffff:c633:6407]> OK\r\n"),
        (b"RCPT TO:<nobody@[127.0.0.1]>\r\n", b"550 5.1.1 <nobody@pop.contoso.test>: no such user here\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("ted@pop.contoso.test")) == 1
    assert len(store.messages("ann@pop.contoso.test")) == 1
    assert len(store.messages("postmaster@pop.contoso.test")) == 1


def test_trusted_client_may_relay_to_a_foreign_literal() -> None:
    """A literal that is not ours is a foreign destination: a client in relay.networks may send
    there (queued for that address), like any foreign domain."""
    factory, _, _, queue, _ = make_factory(resolve_host=lambda name: [])
    proto, t = session(factory, peer="192.0.2.7")
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<x@[IPv6:2001:DB8::9]>\r\n", b"250 2.1.5 Recipient <x@[IPv6:2001:db8::9]> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    [(_, env)] = queue.items
    assert env["recipients"][0]["address"] == "x@[IPv6:2001:db8::9]"


def test_valid_forms_refused_as_policy_get_a_policy_code() -> None:
    """A one-label domain or a General-address-literal is valid RFC 5321 syntax: refused with
    553 5.7.1 (a policy code), not a 501; the session goes on."""
    factory, *_ = make_factory()
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@localhost>\r\n",
         b"553 5.7.1 Sender address rejected: domain 'localhost' is not fully qualified\r\n"),
        (b"MAIL FROM:<a@[x-tag:anything]>\r\n",
         b"553 5.7.1 Sender address rejected: address literal [x-tag:anything]: only IPv4 and "
         b"IPv6 literals are accepted\r\n"),
        (b'MAIL FROM:<"a b"@example.test>\r\n', b'250 2.1.0 Sender <"a b"@example.test> OK\r\n'),
        (b"RCPT TO:<root@localhost>\r\n",
         b"553 5.7.1 Recipient address rejected: domain 'localhost' is not fully qualified\r\n"),
        (b"RCPT TO:<a@[192.0.2.300]>\r\n",
         b"501 5.1.3 Bad recipient address syntax: address literal [192.0.2.300] is not an IPv4 "
         b"address\r\n"),
        (b"NOOP\r\n", b"250 2.0.0 OK\r\n"),
    ], transport=t)


def test_role_target_missing_is_550_without_naming_it(tmp_path: Path) -> None:
    """A postmaster target that does not exist (its mailbox removed) gives 550 5.1.1 naming the
    address the client gave, not the configured target."""
    factory, *_ = make_factory()  # the fake store has no postmaster mailbox
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<postmaster@pop.contoso.test>\r\n",
         b"550 5.1.1 <postmaster@pop.contoso.test>: no such user here\r\n"),
    ], transport=t)


def test_gateway_postmaster_of_its_authoritative_domain(tmp_path: Path) -> None:
    """The gateway role: postmaster@ an authoritative domain that the directory does not know
    lands in the postmaster mailbox; a directory user called postmaster would get its own."""
    from tests.unit.test_gateway import SHARED, gateway_factory

    factory, store, *_ = gateway_factory(tmp_path)
    store.add(f"postmaster@{SHARED}")  # created at start (service.prepare_state)
    proto, t = session(factory)
    run_dialogue(proto, [
        (b"EHLO mx.example.test\r\n", lambda got: got.startswith(b"250-")),
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<Postmaster>\r\n", f"250 2.1.5 Recipient <postmaster@{SHARED}> OK\r\n".encode()),
        (f"RCPT TO:<postmaster@{SHARED}>\r\n".encode(),
         f"250 2.1.5 Recipient <postmaster@{SHARED}> OK\r\n".encode()),
        (f"RCPT TO:<nobody@{SHARED}>\r\n".encode(),
         f"550 5.1.1 <nobody@{SHARED}>: no such user here\r\n".encode()),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages(f"postmaster@{SHARED}")) == 1


# ------------------------------------------------------------------ second round (issue 11)


def test_source_routes_are_ignored_and_never_relay() -> None:
    """RFC 5321 4.1.1.3 and appendix C: a source route (A-d-l) in MAIL FROM or RCPT TO is
    accepted and ignored; the Mailbox after it is judged, so a route through a local or relay
    domain never opens a relay, and a route to a local mailbox delivers there. A route outside
    the A-d-l grammar is a syntax error (501 5.1.3); the session goes on."""
    factory, store, _, queue, _ = make_factory()
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<@a.example,@b.example:odd@example.test> SIZE=10\r\n",
         b"250 2.1.0 Sender <odd@example.test> OK\r\n"),
        (b"RCPT TO:<@foreign.example:ted@pop.contoso.test>\r\n",
         b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<@pop.contoso.test:victim@foreign.example>\r\n",
         b"554 5.7.1 Relay access denied for <victim@foreign.example>\r\n"),
        (b"RCPT TO:<@exchange.northwindtraders.test,@pop.contoso.test:victim@foreign.example>\r\n",
         b"554 5.7.1 Relay access denied for <victim@foreign.example>\r\n"),
        (b"RCPT TO:<@[127.0.0.1]:victim@foreign.example>\r\n",
         b"501 5.1.3 Bad recipient address syntax: malformed source route\r\n"),
        (b"RCPT TO:<@pop.contoso.test:>\r\n",
         b"501 5.1.3 Bad recipient address syntax: malformed source route\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    [message] = store.messages("ted@pop.contoso.test")
    assert message.startswith(b"Return-Path: <odd@example.test>\n")
    assert queue.items == []


def test_non_ascii_addresses_get_553_5_6_7() -> None:
    """SMTPUTF8 is not offered: a non-ASCII address in MAIL FROM or RCPT TO (UTF-8, or octets
    that are not UTF-8) gets 553 5.6.7 (RFC 6531 section 3.5, "non-ASCII addresses not
    permitted"), not 500 "command unrecognized"; it does not count as a syntax error, so the
    session goes on however many there are. A non-ASCII parameter is 501 5.5.4, and another
    command with non-ASCII octets stays 500 5.5.2."""
    factory, _, _, queue, _ = make_factory()
    proto, t = session(factory, peer="192.0.2.7")  # trusted: may relay, and still refused
    sender_refused = (b"553 5.6.7 Sender address rejected: non-ASCII addresses need SMTPUTF8, "
                      b"which this server does not offer\r\n")
    rcpt_refused = (b"553 5.6.7 Recipient address rejected: non-ASCII addresses need SMTPUTF8, "
                    b"which this server does not offer\r\n")
    run_dialogue(proto, [
        HELLO,
        ("MAIL FROM:<t\u00e9d@example.test>\r\n".encode(), sender_refused),
        (b"MAIL FROM:<a@b.test> SMTPUTF8\r\n", b"555 5.5.4 Unsupported parameter SMTPUTF8\r\n"),
        (b"mail from:<a@b.test>\r\n", b"250 2.1.0 Sender <a@b.test> OK\r\n"),
        ("RCPT TO:<t\u00e9d@pop.contoso.test>\r\n".encode(), rcpt_refused),
        ("RCPT TO:<ted@b\u00fccher.example>\r\n".encode(), rcpt_refused),
        (b"RCPT TO:<ted@b\xfccher.example>\r\n", rcpt_refused),  # Latin-1, not UTF-8
        ('RCPT TO:<"\u00e9 x"@foreign.example>\r\n'.encode(), rcpt_refused),
        ("RCPT TO:<ted@pop.contoso.test> ORCPT=rfc822;t\u00e9d\r\n".encode(),
         b"501 5.5.4 Malformed parameter\r\n"),
        ("EHLO h\u00e9llo.example\r\n".encode(), b"500 5.5.2 Syntax error: command is not ASCII\r\n"),
    ] + [("RCPT TO:<\u00e9@foreign.example>\r\n".encode(), rcpt_refused)] * 25 + [
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
    ], transport=t)
    assert queue.items == []


def test_ip_address_as_domain_name_is_policy() -> None:
    """``ted@127.0.0.1`` (an IP address without brackets) is valid RFC 5321 Domain syntax
    that no host name has (RFC 1123 section 2.1): 553 5.7.1 naming the literal to use, for
    a trusted client too (never relayed as a domain name); the bracketed form is this host."""
    factory, store, _, queue, _ = make_factory(store=fresh_store())
    proto, t = session(factory, peer="192.0.2.7")
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@192.0.2.1>\r\n",
         b"553 5.7.1 Sender address rejected: domain '192.0.2.1' is an IP address: write it as "
         b"an address literal [192.0.2.1]\r\n"),
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<ted@127.0.0.1>\r\n",
         b"553 5.7.1 Recipient address rejected: domain '127.0.0.1' is an IP address: write it "
         b"as an address literal [127.0.0.1]\r\n"),
        (b"RCPT TO:<x@198.51.100.9>\r\n",
         b"553 5.7.1 Recipient address rejected: domain '198.51.100.9' is an IP address: write "
         b"it as an address literal [198.51.100.9]\r\n"),
        (b"RCPT TO:<ted@[127.000.000.001]>\r\n", b"250 2.1.5 Recipient <ted@[127.0.0.1]> OK\r\n"),
        (b"RCPT TO:<ann@[IPv6:0:0::1]>\r\n", b"250 2.1.5 Recipient <ann@[IPv6:::1]> OK\r\n"),
    ], transport=t)
    assert queue.items == []


def test_configured_role_targets_receive_their_own_mail() -> None:
    """domains.postmaster / domains.abuse naming a local mailbox with no log-in (created at
    start): mail sent to that address itself is delivered there too (any case, quoted
    dot-atom), not refused with 550 5.1.1; a remote postmaster target addressed directly is
    still a relay question (554 5.7.1 for an untrusted client)."""
    store = FakeMailStore()
    for box in ("ted", "admin", "security"):
        store.add(f"{box}@pop.contoso.test")
    factory, store, _, queue, _ = make_factory(
        config(postmaster="admin@pop.contoso.test", abuse="security@pop.contoso.test"), store=store)
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<admin@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <admin@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<Security@POP.Contoso.Test>\r\n",
         b"250 2.1.5 Recipient <Security@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<\"security\"@pop.contoso.test>\r\n",
         b"250 2.1.5 Recipient <security@pop.contoso.test> OK\r\n"),
        (b"RCPT TO:<nobody@pop.contoso.test>\r\n",
         b"550 5.1.1 <nobody@pop.contoso.test>: no such user here\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("admin@pop.contoso.test")) == 1
    assert len(store.messages("security@pop.contoso.test")) == 1
    factory, *_ = make_factory(config(postmaster="hostmaster@corp.example"), store=fresh_store())
    proto, t = session(factory)
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<hostmaster@corp.example>\r\n",
         b"554 5.7.1 Relay access denied for <hostmaster@corp.example>\r\n"),
        (b"RCPT TO:<Postmaster>\r\n", b"250 2.1.5 Recipient <postmaster@pop.contoso.test> OK\r\n"),
    ], transport=t)


def test_postmaster_of_domains_that_are_not_ours_is_not_taken() -> None:
    """postmaster@ a relay domain (domains.remote relay = true) is queued for that domain, not
    taken into our postmaster mailbox; postmaster@ a foreign domain from a trusted client is
    relayed there. Both domains keep their own postmaster."""
    factory, store, _, queue, _ = make_factory(store=fresh_store())
    proto, t = session(factory, peer="192.0.2.7")
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<postmaster@exchange.northwindtraders.test>\r\n",
         b"250 2.1.5 Recipient <postmaster@exchange.northwindtraders.test> OK\r\n"),
        (b"RCPT TO:<POSTMASTER@foreign.example>\r\n",
         b"250 2.1.5 Recipient <POSTMASTER@foreign.example> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert store.messages("postmaster@pop.contoso.test") == []
    [(_, env)] = queue.items
    assert [r["address"] for r in env["recipients"]] == [
        "postmaster@exchange.northwindtraders.test", "POSTMASTER@foreign.example"]


def test_domain_added_at_run_time_is_local_at_once_for_a_trusted_client() -> None:
    """Right after `domain add` (the session's cached domain list does not have it yet), mail
    from a client in relay.networks for the new domain is delivered here, not relayed out:
    postmaster@ lands in the postmaster mailbox, an unknown user is 550 5.1.1. Right after
    `domain remove` the domain is foreign again (554 5.7.1, or relayed for a trusted client),
    its postmaster no longer taken here."""
    store = fresh_store()
    factory, store, _, queue, clock = make_factory(store=store)
    proto, t = session(factory, peer="192.0.2.7")
    run_dialogue(proto, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<ted@pop.contoso.test>\r\n", b"250 2.1.5 Recipient <ted@pop.contoso.test> OK\r\n"),
    ], transport=t)
    store.add_domain("added.test")  # pop3coexist-admin domain add, while the session runs
    run_dialogue(proto, [
        (b"RCPT TO:<postmaster@added.test>\r\n", b"250 2.1.5 Recipient <postmaster@added.test> OK\r\n"),
        (b"RCPT TO:<nobody@added.test>\r\n", b"550 5.1.1 <nobody@added.test>: no such user here\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("postmaster@pop.contoso.test")) == 1
    assert queue.items == []
    store.remove_domain("added.test")  # domain remove, within the cache second
    proto2, t2 = session(factory)  # untrusted: foreign at once
    run_dialogue(proto2, [
        HELLO,
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<postmaster@added.test>\r\n",
         b"554 5.7.1 Relay access denied for <postmaster@added.test>\r\n"),
        (b"RCPT TO:<nobody@added.test>\r\n",
         b"554 5.7.1 Relay access denied for <nobody@added.test>\r\n"),
    ], transport=t2)
    run_dialogue(proto, [  # trusted: relayed there like any foreign domain
        (b"MAIL FROM:<a@example.org>\r\n", b"250 2.1.0 Sender <a@example.org> OK\r\n"),
        (b"RCPT TO:<postmaster@added.test>\r\n", b"250 2.1.5 Recipient <postmaster@added.test> OK\r\n"),
        (b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (b"Subject: s\r\n\r\nbody\r\n.\r\n", lambda got: got.startswith(b"250 2.0.0 Ok: queued")),
    ], transport=t)
    assert len(store.messages("postmaster@pop.contoso.test")) == 1
    [(_, env)] = queue.items
    assert [r["address"] for r in env["recipients"]] == ["postmaster@added.test"]
