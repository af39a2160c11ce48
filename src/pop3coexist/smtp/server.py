"""The ESMTP server (RFC 5321) over ``twisted.mail.smtp.ESMTP``: MX, submission and SMTPS.

``SMTPServerFactory`` builds one ``ESMTPServer`` per connection. The class keeps Twisted's
ESMTP skeleton (TimeoutMixin, ``host``, the ``extensions`` idea) but replaces its input
handling and commands, because the stock ones are unsafe for a real server:

- input is our own byte buffer, answered strictly in order: while a command waits on a
  Deferred (directory, disk) the following pipelined commands wait too (RFC 2920);
- a command or AUTH line ends at CRLF, or at a bare LF with ``smtp.bare_newline = "normalize"``
  (refused at once with ``"reject"``); a bare CR or another control character in it is refused
  (``500 5.5.2``), so none reaches a stored value (HELO name, AUTH identity, logs, Received);
- STARTTLS discards everything pipelined after it and resets the session (RFC 3207 4.2);
- ``AUTH`` with no argument, a bad mechanism or bad base64 gets a 5xx and the session goes on;
- EHLO advertises only what is implemented; every reply after the greeting and EHLO carries an
  enhanced status code (RFC 2034, RFC 3463);
- DATA is a byte stream into a spool file (``incoming.MessageReader``): only CRLF.CRLF ends it,
  and the 250 goes out only after ``incoming.GroupCommitter`` made it durable (one batch of
  syncs for every session whose DATA ended meanwhile).

The protocol parses and replies; it decides nothing about mail. Each session holds an avatar
of ``policy.delivery`` (``IMessageDelivery``: anonymous, or the account's after AUTH, from the
factory's ``DeliveryRealm``) and asks it one question per command: ``validate_from`` at MAIL
(sender ownership), ``validate_to`` at RCPT (relay rules, gateway, directory, mailbox, quota,
role addresses, address literals of this host), ``begin`` for the transaction, whose ``commit``
at the end of DATA runs the declared stages of ``policy.stages``. Connection control is
``policy.connections``', failed log-in delays ``policy.throttle``'s, concurrent connections
``policy.connlimit``'s.

The session is split by verb group: ``smtp.session`` (connection, framing, replies, the
command loop, ``reply_for``), ``smtp.hello`` (EHLO, HELO, STARTTLS and the small commands),
``smtp.login`` (AUTH), ``smtp.transaction`` (MAIL, RCPT; their arguments are parsed by
``smtp.params``) and ``smtp.data`` (DATA); ``ESMTPServer`` here mixes them together.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol, threads

from pop3coexist.fsutil import syncfs_is_durable
from pop3coexist.interfaces import IScramKeyStore
from pop3coexist.policy.connections import ConnectionPolicy
from pop3coexist.policy.connlimit import ConnectionLimiter
from pop3coexist.policy.delivery import DeliveryContext, DeliveryRealm
from pop3coexist.policy.throttle import AuthThrottle, LoginGate
from pop3coexist.smtp.data import DataCommands
from pop3coexist.smtp.hello import HelloCommands
from pop3coexist.smtp.incoming import GroupCommitter
from pop3coexist.smtp.login import AuthCommands
from pop3coexist.smtp.serial import SerialThread
from pop3coexist.smtp.session import MODES, Session
from pop3coexist.smtp.transaction import MailCommands


class ESMTPServer(HelloCommands, AuthCommands, MailCommands, DataCommands, Session):
    """One SMTP session. See the module docstring for what differs from Twisted's ESMTP."""


class SMTPServerFactory(protocol.ServerFactory):
    """Builds ESMTP sessions for one listener kind.

    ``mode``: ``"mx"`` (anonymous mail for local and relay domains; AUTH optional),
    ``"submission"`` (AUTH required before MAIL, 530 5.7.0), ``"smtps"`` (TLS from the first
    byte: either the listener is wrapped in ``TLSMemoryBIOFactory``, or on a plain TCP
    transport the session starts TLS itself before the greeting; a submission port, RFC 8314
    section 3.3: AUTH required too unless ``smtp.tls_listen_requires_auth`` is false).
    ``auth_required``: whether MAIL needs AUTH first on this listener.
    ``run_blocking(f, *args)`` runs blocking store/queue calls off the reactor and returns a
    Deferred (default: the reactor's thread pool). ``throttle`` and ``limiter`` may be shared
    between listeners (one AuthThrottle with POP3, one ConnectionLimiter for all SMTP ports).
    ``realm`` gives each session its avatar (policy/delivery.py); ``resolve_host(name)``
    (blocking) finds the addresses of ``server.hostname`` for address literals; ``verifier``
    (an ``ISenderVerifier``) checks SPF, DKIM and DMARC of mail from outside. ``rules``:
    the per-recipient rules stage's ``IMailboxRules`` (Sieve, policy/rules.py) or None;
    ``srs``: the ``policy.srs.SRS`` that turns bounce addresses back, or None.
    ``content_filters``: the listener's milters (an ``IContentFilterFactory``) or None;
    ``quarantine``: the ``IQuarantine`` their quarantine verdicts fill.
    """

    def __init__(
        self,
        config,
        store,
        checker,
        queue,
        tls_options=None,
        mode: str = "mx",
        reactor=None,
        run_blocking=None,
        throttle: AuthThrottle | None = None,
        limiter: ConnectionLimiter | None = None,
        resolve_host=None,
        verifier=None,
        rules=None,
        srs=None,
        content_filters=None,
        quarantine=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "smtps" and tls_options is None:
            raise ValueError("mode 'smtps' needs tls_options")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.store = store
        self.checker = checker
        self.queue = queue
        self.tls_options = tls_options
        self.mode = mode
        # submission, and SMTPS unless smtp.tls_listen_requires_auth = false (RFC 8314 3.3)
        self.auth_required = mode == "submission" or (
            mode == "smtps" and config.smtp.tls_listen_requires_auth)
        self.reactor = reactor
        run_batch = run_blocking
        if run_blocking is None:

            def run_blocking(f, *args, **kwargs):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

            # the group commit's batches on a thread of their own (smtp/serial.py, issue 17)
            run_batch = SerialThread(reactor, f"pop3coexist-commit-{mode}")

        self.run_blocking = run_blocking
        # one batch of fsyncs for all sessions' messages that end meanwhile (incoming.py); on
        # FUSE or a network file system (a shared volume) syncfs does not reach the disks
        # where the data is kept: each file is fsynced (README "Several servers")
        durable = syncfs_is_durable(config.server.mailroot) if config is not None else True
        self.committer = (GroupCommitter(store, queue, run_blocking, run_batch=run_batch)
                          if durable else
                          GroupCommitter(store, queue, run_blocking, sync_fs=None,
                                         run_batch=run_batch))
        smtp_cfg = config.smtp
        self.throttle = throttle or AuthThrottle(reactor, base=smtp_cfg.auth_failure_delay)
        self.gate = LoginGate.for_throttle(self.throttle, reactor)  # every password check waits its turn here
        self.limiter = limiter or ConnectionLimiter(
            smtp_cfg.max_connections, smtp_cfg.max_connections_per_client
        )
        self.connections = ConnectionPolicy(smtp_cfg.client_allow, smtp_cfg.client_deny)
        # every sender and recipient decision: the avatars of policy/delivery.py
        self.context = DeliveryContext(config, store, checker, self.committer, run_blocking,
                                       reactor, resolve_host, verifier, rules=rules, srs=srs,
                                       content_filters=content_filters,
                                       quarantine=quarantine, queue=queue)
        self.realm = DeliveryRealm(self.context)

    @property
    def offers_secrets(self) -> bool:
        return bool(self.checker.offers_secrets)  # IAccountChecker declares it

    @property
    def scram_store(self) -> Any:
        """The checker when it offers SCRAM-SHA-256 now (``IScramKeyStore``), else None."""
        checker = self.checker
        if IScramKeyStore.providedBy(checker) and checker.offers_scram:
            return checker
        return None

    def buildProtocol(self, addr) -> ESMTPServer:
        p = ESMTPServer(self)
        p.factory = self
        return p

