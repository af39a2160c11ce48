"""The directory checker (``auth.method = "directory"``): Active Directory style LDAP.

Implements ``interfaces.IAccountChecker`` with ldaptor (Deferred-native; no threads).

Log-in (``requestAvatarId``)
    1. An empty password is refused before anything is sent (an LDAP simple bind with an empty
       password is an *anonymous* bind and would succeed).
    2. The log-in name is checked with ``identity.logins.map_login``. A full address (any case,
       any domain) is looked up as ``userPrincipalName``, ``mail`` or any ``proxyAddresses``
       entry; a bare name, only when exactly one local domain exists, as ``sAMAccountName`` or
       as that domain's address. Every value is escaped per RFC 4515 (``ldapfilter``).
    3. The search runs on a shared connection bound as the service account (``bind_dn``, the
       password read from ``bind_password_file`` at each (re)connect). Exactly one entry must
       match; none or several is a refused log-in.
    4. Disabled (``userAccountControl`` bit 0x2) or locked-out (bit 0x10) accounts are refused;
       with ``required_group`` the entry's ``memberOf`` must name that group.
    5. The password is checked by a simple bind as the entry's DN on a separate, pooled
       connection (so the service connection keeps its identity).

The mailbox of a directory user (``"mailbox@domain"``, lower case) is the first of these that
lies in a local domain: the primary SMTP proxy address (``SMTP:``), ``mail``, the secondary
``smtp:`` proxy addresses (in the order the local domains are configured, then
alphabetically), ``userPrincipalName``. The avatar id of a log-in is that mailbox; a user with
no address in a local domain has no mailbox here but still logs in (SMTP AUTH needs an
account, not a mailbox: the POP3 server's relay account, service accounts, POP3 users sending
through the gateway), with the first address of the same list in any domain as avatar id
(``account_of``); POP3 then refuses it (no mailbox). The log-in name may be an address in any
domain. Two users can have the same name in different domains (``ted@contoso.test`` and
``ted@fabrikam.test`` are two entries).

Senders (``sender_owner``): the account that has the address as ``mail`` or any
``proxyAddresses`` entry, in any domain, among the entries that pass ``user_filter``.

Recipients (``resolve_recipient``) match ``mail`` or any ``proxyAddresses`` entry
(``SMTP:``/``smtp:``, case-insensitively) of an entry that passes ``user_filter``; the address
must be in a local domain. Disabled accounts still receive mail (as a locked mailbox does).
The same search also finds the groups (``objectClass=group``) with the address, and the group
look-up that follows it (``group``, IGroupLookup) uses them instead of searching again: an
address that nothing has costs one search, not two (a group entry is never a mailbox, even
where ``user_filter`` would match it).
``lookup`` answers for any directory object (users, contacts) with its attributes, for the
gateway role.

Failures: a directory that cannot be reached, times out (``auth.directory.timeout``) or
answers with a server-side error gives ``errors.AuthUnavailable`` - never a false success.
Broken connections are dropped and re-established on the next request; a request that fails
because a reused connection had gone stale is retried once on a fresh connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapclient
from twisted.cred import credentials as cred_credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3coexist import address as addr_mod
from pop3coexist import ldapfilter
from pop3coexist.config import Config, read_secret
from pop3coexist.errors import AuthUnavailable, ConfigError
from pop3coexist.identity.logins import map_login
from pop3coexist.identity.stamps import stamp_of
from pop3coexist.interfaces import (
    Distribution,
    IAccountChecker,
    IClosable,
    ICredentialStamp,
    IDirectoryLookup,
    IGroupLookup,
    ISelfCheck,
)

log = Logger()

UF_ACCOUNTDISABLE = 0x2
UF_LOCKOUT = 0x10
# what says an entry's password changed, in the order asked (credential_stamp)
_STAMP_ATTRIBUTES = ("pwdLastSet", "pwdChangedTime", "modifyTimestamp", "entryCSN")

# Bind results that mean "these credentials do not log in" (not "the directory is broken").
_REFUSED_BIND_CODES = frozenset({48, 49, 50, 53, 19})
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32
MAX_GROUP_DEPTH = 16  # nesting levels of groups followed
MAX_GROUP_ENTRIES = 5000  # member entries read for one group, nested ones included
GROUP_CLASS = "group"
# A recipient search also finds groups with the address (one search, not two, for an address
# nothing here has); its groups are kept this long for the group look-up that follows it
GROUP_HINT_SECONDS = 5.0
GROUP_HINTS_MAX = 256
RECIPIENT_SEARCH_LIMIT = 4  # entries: several users, or a user and a group, are both seen
_MAX_IDLE_BIND_CONNECTIONS = 4


class _DirectoryError(Exception):
    """Internal: the directory failed; becomes AuthUnavailable at the edge."""


class _StaleConnection(_DirectoryError):
    """Internal: a reused connection turned out to be closed."""


@dataclass(frozen=True)
class _Entry:
    dn: str
    attrs: dict[str, list[str]]  # lower-case attribute name -> values

    def get(self, name: str) -> list[str]:
        return self.attrs.get(name.lower(), [])

    def first(self, name: str) -> str | None:
        values = self.get(name)
        return values[0] if values else None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def normalise_dn(dn: str) -> str:
    """A DN in a form good for comparing: RDNs split at unescaped commas, spaces around
    ``,`` ``=`` and ``+`` removed, lower case (AD and OpenLDAP compare DNs without case)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in dn:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch in ",;":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    out = []
    for rdn in parts:
        avas = []
        for ava in rdn.split("+"):
            name, _, value = ava.partition("=")
            avas.append(f"{name.strip().lower()}={value.strip().lower()}")
        out.append("+".join(avas))
    return ",".join(out)


class _Connection:
    """One LDAP connection: ldaptor's LDAPClient plus timeouts and result checking."""

    def __init__(self, client: Any, reactor: Any, timeout: float) -> None:
        self.client = client
        self.reactor = reactor
        self.timeout = timeout
        self.used = False  # has answered at least one request (so it may have gone stale)

    @property
    def connected(self) -> bool:
        return bool(getattr(self.client, "connected", False))

    def close(self) -> None:
        transport = getattr(self.client, "transport", None)
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        try:
            if abort is not None:
                abort()
            else:
                transport.loseConnection()
        except Exception:  # already closed
            pass

    def _guard(self, d: defer.Deferred, what: str) -> defer.Deferred:
        """Fail ``d``'s result with _DirectoryError on timeout or lost connection."""
        result: defer.Deferred = defer.Deferred()
        stale_possible = self.used

        def on_timeout() -> None:
            if not result.called:
                result.errback(Failure(_DirectoryError(f"{what}: no answer within {self.timeout:g}s")))
            self.close()

        timer = self.reactor.callLater(self.timeout, on_timeout)

        def done(value: Any) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if isinstance(value, Failure):
                if value.check(ConnectionDone, ConnectionLost, ldapclient.LDAPClientConnectionLostException):
                    cls = _StaleConnection if stale_possible else _DirectoryError
                    result.errback(Failure(cls(f"{what}: connection lost")))
                elif value.check(_DirectoryError):
                    result.errback(value)
                else:
                    result.errback(Failure(_DirectoryError(f"{what}: {value.getErrorMessage()}")))
            else:
                self.used = True
                result.callback(value)

        d.addBoth(done)
        return result

    def _send(self, op: Any, what: str) -> defer.Deferred:
        try:
            d = self.client.send(op)
        except Exception as e:  # LDAPClientConnectionLostException when already closed
            cls = _StaleConnection if self.used else _DirectoryError
            return defer.fail(cls(f"{what}: {e.__class__.__name__}"))
        return self._guard(d, what)

    def start_tls(self, options: Any) -> defer.Deferred:
        """RFC 4511 StartTLS, then TLS on the transport (certificate checked by ``options``)."""

        def answered(msg: Any) -> None:
            code = getattr(msg, "resultCode", None)
            if code != _SUCCESS:
                raise _DirectoryError(f"StartTLS refused (result code {code})")
            self.client.transport.startTLS(options)

        return self._send(pureldap.LDAPStartTLSRequest(), "StartTLS").addCallback(answered)

    def bind(self, dn: str, password: bytes) -> defer.Deferred:
        """Simple bind; fires with the LDAP result code (0 is success)."""
        op = pureldap.LDAPBindRequest(dn=dn, auth=password)
        return self._send(op, "bind").addCallback(lambda msg: msg.resultCode)

    def search(self, base: str, filter_obj: Any, attributes: list[str], size_limit: int,
               scope: int = pureldap.LDAP_SCOPE_wholeSubtree) -> defer.Deferred:
        """Subtree search (or ``scope``); fires with a list of _Entry (at most
        ``size_limit``); a base that does not exist gives no entries."""
        op = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit,
            timeLimit=max(1, int(self.timeout)),
            typesOnly=0,
            filter=filter_obj,
            attributes=attributes,
        )
        entries: list[_Entry] = []
        finished: defer.Deferred = defer.Deferred()

        def handler(msg: Any) -> bool:
            if isinstance(msg, pureldap.LDAPSearchResultEntry):
                attrs: dict[str, list[str]] = {}
                for name, values in msg.attributes:
                    attrs.setdefault(_text(name).lower(), []).extend(_text(v) for v in values)
                entries.append(_Entry(_text(msg.objectName), attrs))
                return False
            if isinstance(msg, pureldap.LDAPSearchResultDone):
                if not finished.called:
                    if msg.resultCode in (_SUCCESS, _SIZE_LIMIT_EXCEEDED, _NO_SUCH_OBJECT):
                        finished.callback(entries)
                    else:
                        finished.errback(
                            Failure(_DirectoryError(f"search failed (result code {msg.resultCode})"))
                        )
                return True
            return False  # referrals and intermediate responses are ignored

        try:
            wire = self.client.send_multiResponse(op, handler)
        except Exception as e:
            cls = _StaleConnection if self.used else _DirectoryError
            return defer.fail(cls(f"search: {e.__class__.__name__}"))
        # ldaptor fires ``wire`` only when the connection is lost (errback); pass that on.
        wire.addErrback(lambda f: None if finished.called else finished.errback(f))
        return self._guard(finished, "search")


Connector = Callable[[], defer.Deferred]


@implementer(IAccountChecker, IDirectoryLookup, ISelfCheck, IClosable, IGroupLookup,
             ICredentialStamp)
class DirectoryChecker:
    """See IAccountChecker; the AD-style LDAP method (module docstring has the rules)."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)
    offers_secrets = False

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        *,
        connector: Connector | None = None,
        local_domains: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """``connector`` (tests) returns a Deferred firing with a connected LDAPClient-like
        protocol; by default the URL in ``[auth.directory]`` is used. ``local_domains`` gives
        the current local domains (default: ``[domains] local`` of the config)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.cfg = config.auth.directory
        self.reactor = reactor
        self.timeout = self.cfg.timeout if self.cfg.timeout > 0 else 10.0
        self._connector = connector or self._connect_url
        self._local_domains = local_domains or (lambda: config.domains.local)
        try:
            ldapfilter.parse_filter(self.cfg.user_filter)
        except ldapfilter.FilterError as e:
            raise ConfigError(f"[auth.directory.user_filter] {e}")
        self._service: _Connection | None = None
        self._service_pending: list[defer.Deferred] | None = None
        self._idle_binders: list[_Connection] = []
        self._closed = False
        # address key -> (time, group entries with that address) from the last recipient
        # search, taken by the group look-up that follows (see resolve_recipient)
        self._group_hints: dict[str, tuple[float, list[_Entry]]] = {}
        a = self.cfg.attributes
        self._attributes = [
            a.user_principal_name, a.account_name, a.mail, a.proxy_addresses,
            a.target_address, a.account_control, a.member_of,
        ]
        self._group_attributes = [*self._attributes, "objectClass", "member", "managedBy"]

    def __repr__(self) -> str:
        return f"<DirectoryChecker {self.cfg.url} base={self.cfg.base_dn!r}>"

    def check(self) -> None:
        """Start-up check (blocking, no network): the bind password file is readable and not
        empty, the CA file holds a certificate. The directory itself may be down at start: then
        log-ins fail temporarily until it is back."""
        if self.cfg.bind_password_file is None:
            raise ConfigError("[auth.directory.bind_password_file] is required")
        try:
            secret = read_secret(self.cfg.bind_password_file)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"[auth.directory.bind_password_file] cannot read {self.cfg.bind_password_file}: "
                f"{getattr(e, 'strerror', None) or e.__class__.__name__}"
            )
        if not secret:
            raise ConfigError(f"[auth.directory.bind_password_file] {self.cfg.bind_password_file} is empty")
        if self.cfg.url.lower().startswith("ldaps:") or self.cfg.starttls:
            try:
                self._tls_options(self._url_parts()[1])
            except (OSError, _DirectoryError, Exception) as e:
                raise ConfigError(f"[auth.directory.ca_file] cannot use it: {e}")

    # ------------------------------------------------------------------ connections

    def _tls_options(self, host: str) -> Any:
        from twisted.internet import ssl

        trust: Any = None
        if self.cfg.ca_file is not None:
            pem = self.cfg.ca_file.read_bytes()
            marker = b"-----BEGIN CERTIFICATE-----"
            certs = [ssl.Certificate.loadPEM(marker + p) for p in pem.split(marker)[1:]]
            if not certs:
                raise _DirectoryError(f"no certificate in ca_file {self.cfg.ca_file}")
            trust = ssl.trustRootFromCertificates(certs)
        if trust is None:
            return ssl.optionsForClientTLS(host)
        return ssl.optionsForClientTLS(host, trustRoot=trust)

    def _url_parts(self) -> tuple[str, str, int]:
        parts = urlsplit(self.cfg.url)
        scheme = parts.scheme.lower()
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (636 if scheme == "ldaps" else 389)
        return scheme, host, port

    def _connect_url(self) -> defer.Deferred:
        from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

        scheme, host, port = self._url_parts()
        endpoint: Any = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        if scheme == "ldaps":
            endpoint = wrapClientTLS(self._tls_options(host), endpoint)
        return connectProtocol(endpoint, ldapclient.LDAPClient())

    def _open(self) -> defer.Deferred:
        """A new _Connection (TLS started if configured), not bound yet."""

        def connected(client: Any) -> Any:
            conn = _Connection(client, self.reactor, self.timeout)
            if self.cfg.starttls:
                _, host, _ = self._url_parts()
                return conn.start_tls(self._tls_options(host)).addCallback(lambda _: conn)
            return conn

        def failed(f: Failure) -> Failure:
            if f.check(_DirectoryError):
                return f
            return Failure(_DirectoryError(f"cannot connect to {self.cfg.url}: {f.getErrorMessage()}"))

        try:
            d = self._connector()
        except Exception as e:
            d = defer.fail(e)
        # The connect itself is bounded by the endpoint's timeout; a fake connector is not.
        return d.addCallback(connected).addErrback(failed)

    def _service_connection(self) -> defer.Deferred:
        """The shared connection bound as the service account, (re)established when needed."""
        if self._service is not None and self._service.connected:
            return defer.succeed(self._service)
        self._service = None
        waiter: defer.Deferred = defer.Deferred()
        if self._service_pending is not None:
            self._service_pending.append(waiter)
            return waiter
        self._service_pending = [waiter]

        def bind(conn: _Connection) -> defer.Deferred:
            try:
                secret = read_secret(self.cfg.bind_password_file) if self.cfg.bind_password_file else ""
            except OSError as e:
                conn.close()
                raise _DirectoryError(f"cannot read bind_password_file: {e.strerror}")

            def bound(code: int) -> _Connection:
                if code != _SUCCESS:
                    conn.close()
                    raise _DirectoryError(
                        f"the service account {self.cfg.bind_dn!r} cannot bind (result code {code})"
                    )
                conn.used = False  # a fresh connection: failures on it are not staleness
                return conn

            if not secret:
                conn.close()
                raise _DirectoryError("bind_password_file is empty")
            return conn.bind(self.cfg.bind_dn, secret.encode("utf-8")).addCallback(bound)

        def finish(result: Any) -> None:
            waiters, self._service_pending = self._service_pending or [], None
            if isinstance(result, _Connection):
                self._service = result
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        self._open().addCallback(bind).addBoth(finish)
        return waiter

    def _with_service(self, action: Callable[[_Connection], defer.Deferred]) -> defer.Deferred:
        """Run ``action`` on the service connection; retry once if a reused one was stale."""
        return defer.ensureDeferred(self._on_service(action))

    async def _on_service(self, action: Callable[[_Connection], defer.Deferred]) -> Any:
        for attempt in (1, 2):
            try:
                return await action(await self._service_connection())
            except _StaleConnection as e:
                self._service = None
                if attempt == 2:
                    raise _DirectoryError(str(e)) from None
        raise AssertionError("unreachable")

    def _take_binder(self) -> defer.Deferred:
        while self._idle_binders:
            conn = self._idle_binders.pop()
            if conn.connected:
                return defer.succeed(conn)
        return self._open()

    def _give_back_binder(self, conn: _Connection) -> None:
        if conn.connected and not self._closed and len(self._idle_binders) < _MAX_IDLE_BIND_CONNECTIONS:
            self._idle_binders.append(conn)
        else:
            conn.close()

    def _check_password(self, dn: str, password: bytes) -> defer.Deferred:
        """Fires with True (bind succeeded) or False (credentials refused); a reused binder
        connection that turns out stale is replaced once."""
        return defer.ensureDeferred(self._bind_user(dn, password))

    async def _bind_user(self, dn: str, password: bytes) -> bool:
        for attempt in (1, 2):
            try:
                conn = await self._take_binder()
                try:
                    code = await conn.bind(dn, password)
                except BaseException:
                    conn.close()
                    raise
            except _StaleConnection as e:
                if attempt == 2:
                    raise _DirectoryError(str(e)) from None
                continue
            self._give_back_binder(conn)
            if code == _SUCCESS:
                return True
            if code in _REFUSED_BIND_CODES:
                return False
            raise _DirectoryError(f"user bind failed (result code {code})")
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Drop every connection (service shutdown). Later requests reconnect."""
        if self._service is not None:
            self._service.close()
            self._service = None
        while self._idle_binders:
            self._idle_binders.pop().close()

    # ------------------------------------------------------------------ searching

    def _domains(self) -> list[str]:
        return [d.lower() for d in self._local_domains()]

    def _search(self, filter_text: str, size_limit: int = 2,
                attributes: list[str] | None = None) -> defer.Deferred:
        filter_obj = ldapfilter.parse_filter(filter_text)
        attrs = attributes or self._attributes
        return self._with_service(
            lambda conn: conn.search(self.cfg.base_dn, filter_obj, attrs, size_limit)
        )

    def _address_filter(self, address: str, with_upn: bool) -> str:
        a = self.cfg.attributes
        parts = [ldapfilter.equals(a.mail, address), ldapfilter.equals(a.proxy_addresses, "smtp:" + address)]
        if with_upn:
            parts.insert(0, ldapfilter.equals(a.user_principal_name, address))
        return ldapfilter.any_of(*parts)

    def _candidates(self, entry: _Entry, domains: list[str]) -> list[str]:
        """The entry's addresses in order: primary ``SMTP:`` proxy address, ``mail``, secondary
        ``smtp:`` ones (local domains in their configured order, then alphabetically), UPN."""
        a = self.cfg.attributes
        primary: list[str] = []
        secondary: list[str] = []
        for value in entry.get(a.proxy_addresses):
            kind, sep, addr = value.partition(":")
            if not sep or kind.lower() != "smtp":
                continue
            (primary if kind == "SMTP" else secondary).append(addr)
        secondary.sort(key=lambda x: (_domain_rank(x, domains), x.lower()))
        return primary + entry.get(a.mail) + secondary + entry.get(a.user_principal_name)

    def mailbox_of(self, entry: _Entry) -> str | None:
        """The entry's mailbox address in a local domain (see the module docstring), or None."""
        domains = self._domains()
        for cand in self._candidates(entry, domains):
            local, at, domain = cand.strip().lower().rpartition("@")
            if at and domain in domains and addr_mod.is_valid_mailbox_name(local):
                return f"{local}@{domain}"
        return None

    def account_of(self, entry: _Entry) -> str | None:
        """The avatar id of the entry's log-ins: its mailbox (``mailbox_of``) when it has one,
        else the first valid address of the same list in any domain (primary ``SMTP:`` proxy
        address, ``mail``, secondary ``smtp:`` addresses, ``userPrincipalName``), lower case;
        None when the entry has no address at all. Such an address is in no local domain, so
        it never names another account's mailbox."""
        mailbox = self.mailbox_of(entry)
        if mailbox is not None:
            return mailbox
        for cand in self._candidates(entry, self._domains()):
            mapped = addr_mod.login_to_address(cand.strip(), ())
            if mapped is not None:
                return f"{mapped[0]}@{mapped[1]}"
        return None

    # ------------------------------------------------------------------ IAccountChecker

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        """See ICredentialsChecker / IAccountChecker."""
        try:
            login = credentials.username
            if isinstance(login, bytes):
                login = login.decode("utf-8")
            password = credentials.password
            if isinstance(password, str):
                password = password.encode("utf-8")
        except (AttributeError, UnicodeError):
            # a name or password that is no Unicode text (an SMTP AUTH password of octets
            # that are not UTF-8 arrives surrogate-escaped) is a wrong one: 535, not 454
            return defer.fail(UnauthorizedLogin())
        if not password:
            # An LDAP simple bind with an empty password is an anonymous bind: never send it.
            return defer.fail(UnauthorizedLogin())
        domains = self._domains()
        mapped = map_login(login, domains)
        if mapped is None:
            return defer.fail(UnauthorizedLogin())
        a = self.cfg.attributes
        if "@" in login:
            wanted = self._address_filter(f"{mapped[0]}@{mapped[1]}", with_upn=True)
        else:
            wanted = ldapfilter.any_of(
                ldapfilter.equals(a.account_name, mapped[0]),
                self._address_filter(f"{mapped[0]}@{mapped[1]}", with_upn=False),
            )
        filter_text = ldapfilter.all_of(self.cfg.user_filter, wanted)
        return self._edge(defer.ensureDeferred(self._log_in(login, password, filter_text)))

    async def _log_in(self, login: str, password: bytes, filter_text: str) -> str:
        """The search, the account's checks, then the user bind (``requestAvatarId``)."""
        a = self.cfg.attributes
        entries: list[_Entry] = await self._search(filter_text)
        if len(entries) != 1:
            if entries:
                log.warn("directory log-in {login!r}: {n} entries match; refused", login=login, n=len(entries))
            raise UnauthorizedLogin()
        entry = entries[0]
        flags = _int(entry.first(a.account_control))
        if flags & (UF_ACCOUNTDISABLE | UF_LOCKOUT):
            log.info("directory log-in {login!r}: account disabled or locked", login=login)
            raise UnauthorizedLogin()
        if self.cfg.required_group:
            wanted_group = normalise_dn(self.cfg.required_group)
            if wanted_group not in {normalise_dn(g) for g in entry.get(a.member_of)}:
                log.info("directory log-in {login!r}: not in the required group", login=login)
                raise UnauthorizedLogin()
        # SMTP AUTH needs an account, not a mailbox: an account whose addresses are all
        # in other domains logs in too (POP3's realm refuses it: no mailbox here).
        account = self.account_of(entry)
        if account is None:
            log.info("directory log-in {login!r}: the account has no mail address "
                     "(mail, proxyAddresses or userPrincipalName)", login=login)
            raise UnauthorizedLogin()
        if not await self._check_password(entry.dn, password):
            raise UnauthorizedLogin()
        return account

    def credential_stamp(self, account: str) -> defer.Deferred:
        """See ICredentialStamp. One search for the entry whose log-ins give ``account``;
        the stamp covers its DN and its password-change time: ``pwdLastSet`` (Active
        Directory) or ``pwdChangedTime`` (OpenLDAP's ppolicy overlay, RFC draft
        behera-ldap-password-policy section 5.3.2); a directory that keeps neither gives
        ``modifyTimestamp`` (RFC 4512 section 3.4, to the second) and OpenLDAP's
        ``entryCSN`` (to the microsecond), so any change of the entry counts. None
        when no single entry passing ``user_filter`` has the address any more, it is
        disabled or locked (``userAccountControl``), left the required group, or its
        addresses now give another account."""
        key = _address_key(account)
        if key is None:
            return defer.succeed(None)
        filter_text = ldapfilter.all_of(self.cfg.user_filter,
                                        self._address_filter(key, with_upn=True))
        attrs = [*self._attributes, *_STAMP_ATTRIBUTES]

        def found(entries: list[_Entry]) -> bytes | None:
            a = self.cfg.attributes
            if len(entries) != 1:
                return None
            entry = entries[0]
            if _int(entry.first(a.account_control)) & (UF_ACCOUNTDISABLE | UF_LOCKOUT):
                return None
            if self.cfg.required_group and normalise_dn(self.cfg.required_group) not in {
                    normalise_dn(g) for g in entry.get(a.member_of)}:
                return None
            if self.account_of(entry) != key:
                return None
            changed = [entry.first(n) or "" for n in _STAMP_ATTRIBUTES[:2]]
            if not any(changed):  # any change of the entry, to the microsecond where kept
                changed += [entry.first(n) or "" for n in _STAMP_ATTRIBUTES[2:]]
            return stamp_of(b"ldap", normalise_dn(entry.dn), *changed)

        return self._edge(self._search(filter_text, 2, attrs).addCallback(found))

    def resolve_recipient(self, address: str) -> defer.Deferred:
        """See IAccountChecker."""
        key = _address_key(address)
        if key is None or key.rpartition("@")[2] not in self._domains():
            return defer.succeed(None)
        # one search for the accounts and the groups with the address: a group entry can
        # only have matched as a group, any other entry only through user_filter
        filter_text = ldapfilter.all_of(
            self._address_filter(key, with_upn=False),
            ldapfilter.any_of(self.cfg.user_filter, f"(objectClass={GROUP_CLASS})"))

        def found(entries: list[_Entry]) -> str | None:
            users = [e for e in entries if not _is_group(e)]
            if len(entries) < RECIPIENT_SEARCH_LIMIT:  # all of them seen: the groups are known
                self._remember_groups(key, [e for e in entries if _is_group(e)])
            if len(users) != 1:
                if users:
                    log.warn("directory recipient {a!r}: {n} entries match", a=key, n=len(users))
                return None
            return self.mailbox_of(users[0])

        return self._edge(self._search(filter_text, RECIPIENT_SEARCH_LIMIT,
                                       self._group_attributes).addCallback(found))

    def _remember_groups(self, key: str, groups: list[_Entry]) -> None:
        """Keep what a recipient search found of groups with address ``key`` for the group
        look-up that usually follows at once (``group``), GROUP_HINT_SECONDS at most."""
        now = self.reactor.seconds()
        if len(self._group_hints) >= GROUP_HINTS_MAX:
            self._group_hints = {k: v for k, v in self._group_hints.items()
                                 if now - v[0] < GROUP_HINT_SECONDS}
            while len(self._group_hints) >= GROUP_HINTS_MAX:
                del self._group_hints[next(iter(self._group_hints))]
        self._group_hints[key] = (now, groups)

    def _take_groups(self, key: str) -> list[_Entry] | None:
        """The groups a recent recipient search found for ``key`` (taken: used once), or None
        when there was none within GROUP_HINT_SECONDS."""
        hint = self._group_hints.pop(key, None)
        if hint is None or self.reactor.seconds() - hint[0] >= GROUP_HINT_SECONDS:
            return None
        return hint[1]

    def sender_owner(self, address: str) -> defer.Deferred:
        """See IAccountChecker: ``account_of`` the one entry passing ``user_filter`` that has
        ``address`` as ``mail`` or a proxy address, in any domain; None for none or several."""
        key = _address_key(address)
        if key is None:
            return defer.succeed(None)
        filter_text = ldapfilter.all_of(self.cfg.user_filter, self._address_filter(key, with_upn=False))

        def found(entries: list[_Entry]) -> str | None:
            if len(entries) != 1:
                if entries:
                    log.warn("directory sender {a!r}: {n} entries match", a=key, n=len(entries))
                return None
            return self.account_of(entries[0])

        return self._edge(self._search(filter_text).addCallback(found))

    def lookup(self, address: str) -> defer.Deferred:
        """Deferred firing with the attributes of the one directory object (user, contact or
        other) that has ``address`` as ``mail`` or a proxy address, or None (no match, or
        several). The dict: ``dn``, ``mail``, ``proxy_addresses`` (list, as stored),
        ``primary_address`` (from ``SMTP:`` or None), ``target_address`` (``SMTP:`` prefix
        removed, or None), ``user_principal_name``, ``account_name``, ``disabled``,
        ``member_of``, ``mailbox`` (see ``mailbox_of``, or None). Fails with AuthUnavailable.
        """
        key = _address_key(address)
        if key is None:
            return defer.succeed(None)
        filter_text = self._address_filter(key, with_upn=False)
        a = self.cfg.attributes

        def found(entries: list[_Entry]) -> dict | None:
            if len(entries) != 1:
                return None
            e = entries[0]
            proxies = e.get(a.proxy_addresses)
            primary = next((p[5:] for p in proxies if p.startswith("SMTP:")), None)
            target = e.first(a.target_address)
            if target is not None and target.lower().startswith("smtp:"):
                target = target[5:]
            return {
                "dn": e.dn,
                "mail": e.first(a.mail),
                "proxy_addresses": list(proxies),
                "primary_address": primary,
                "target_address": target,
                "user_principal_name": e.first(a.user_principal_name),
                "account_name": e.first(a.account_name),
                "disabled": bool(_int(e.first(a.account_control)) & UF_ACCOUNTDISABLE),
                "member_of": list(e.get(a.member_of)),
                "mailbox": self.mailbox_of(e),
            }

        return self._edge(self._search(filter_text).addCallback(found))

    # ------------------------------------------------------------------ IGroupLookup

    def group(self, address: str) -> defer.Deferred:
        """See IGroupLookup: the one ``objectClass=group`` entry with ``address`` as ``mail`` or
        a proxy address; its ``member`` DNs read one by one (breadth first, in order), a
        member that is a group expanded in turn, each DN once (a group that contains itself,
        or two that contain each other, end there), at most MAX_GROUP_DEPTH levels and
        MAX_GROUP_ENTRIES entries. A member's address: its mailbox here, else its
        ``targetAddress`` (a contact), ``mail``, or first address. The owner: the address of
        the ``managedBy`` entry, or None."""
        key = _address_key(address)
        if key is None:
            return defer.succeed(None)
        return self._edge(defer.ensureDeferred(self._group(key, self._take_groups(key))))

    def _read_entry(self, dn: str) -> defer.Deferred:
        """The entry ``dn`` (a list of at most one _Entry)."""
        filter_obj = ldapfilter.parse_filter("(objectClass=*)")
        attrs = [*self._attributes, "objectClass", "member", "managedBy"]
        return self._with_service(lambda conn: conn.search(
            dn, filter_obj, attrs, 1, scope=pureldap.LDAP_SCOPE_baseObject))

    def _member_address(self, entry: _Entry) -> str | None:
        a = self.cfg.attributes
        mailbox = self.mailbox_of(entry)
        if mailbox is not None:
            return mailbox
        target = entry.first(a.target_address)
        if target is not None and target.lower().startswith("smtp:"):
            target = target[5:]
        for candidate in (target, entry.first(a.mail), self.account_of(entry)):
            if candidate:
                key = _address_key(candidate)
                if key is not None:
                    return key
        return None

    async def _group(self, key: str, found: list[_Entry] | None = None) -> Distribution | None:
        """``group`` of ``key``; ``found``: the group entries a recipient search just found
        for it (then there is no search of its own: none found means no group)."""
        if found is None:
            filter_text = ldapfilter.all_of(f"(objectClass={GROUP_CLASS})",
                                            self._address_filter(key, with_upn=False))
            found = await self._search(filter_text, 2, self._group_attributes)
        if len(found) != 1:
            if found:
                log.warn("directory group {a!r}: {n} entries match", a=key, n=len(found))
            return None
        top = found[0]
        seen = {normalise_dn(top.dn)}
        pending = [(dn, 1) for dn in top.get("member")]
        members: list[str] = []
        reads = 0
        while pending:
            dn, depth = pending.pop(0)
            norm = normalise_dn(dn)
            if norm in seen:
                continue
            seen.add(norm)
            reads += 1
            if reads > MAX_GROUP_ENTRIES:
                log.warn("directory group {a!r}: more than {n} member entries; the rest left "
                         "out", a=key, n=MAX_GROUP_ENTRIES)
                break
            entries = await self._read_entry(dn)
            if not entries:
                log.warn("directory group {a!r}: member {dn!r} does not exist", a=key, dn=dn)
                continue
            entry = entries[0]
            if _is_group(entry):
                if depth >= MAX_GROUP_DEPTH:
                    log.warn("directory group {a!r}: {dn!r} is nested deeper than {n} levels",
                             a=key, dn=dn, n=MAX_GROUP_DEPTH)
                    continue
                pending.extend((m, depth + 1) for m in entry.get("member"))
                continue
            address = self._member_address(entry)
            if address is None:
                log.warn("directory group {a!r}: member {dn!r} has no mail address", a=key, dn=dn)
            elif address not in members:
                members.append(address)
        owner = None
        managed = top.first("managedBy")
        if managed:
            entries = await self._read_entry(managed)
            owner = self._member_address(entries[0]) if entries else None
        # the group's own address (primary SMTP: proxy address, else mail) names its List-Id
        # and owner- address, whichever of its addresses the mail came to
        a = self.cfg.attributes
        primary = next((p[5:] for p in top.get(a.proxy_addresses) if p.startswith("SMTP:")), None)
        address = _address_key(primary or top.first(a.mail) or key) or key
        return Distribution("group", address, tuple(members), "anyone", owner)

    def _edge(self, d: defer.Deferred) -> defer.Deferred:
        """Turn internal directory failures into AuthUnavailable (logged, no secrets)."""

        def unavailable(f: Failure) -> Failure:
            if f.check(_DirectoryError):
                log.warn("directory unavailable: {why}", why=f.getErrorMessage())
                return Failure(AuthUnavailable("the directory cannot be reached now"))
            if f.check(UnauthorizedLogin, AuthUnavailable):
                return f
            log.failure("directory checker failed", f)
            return Failure(AuthUnavailable("the directory cannot answer now"))

        return d.addErrback(unavailable)


def _is_group(entry: _Entry) -> bool:
    """The entry is a directory group (``objectClass=group``, any case)."""
    return GROUP_CLASS in {c.lower() for c in entry.get("objectClass")}


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def _domain_rank(address: str, domains: list[str]) -> int:
    domain = address.rpartition("@")[2].lower()
    return domains.index(domain) if domain in domains else len(domains)


def _address_key(address: str) -> str | None:
    """``local@domain`` lower case, or None when it is not an address we look up."""
    if not isinstance(address, str):
        return None
    try:
        parsed = addr_mod.parse_address(address.strip("<>"))
    except addr_mod.AddressError:
        return None
    if parsed.quoted:
        return None
    return parsed.key.lower()
