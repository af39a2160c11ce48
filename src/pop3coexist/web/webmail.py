"""Web mail: the pages of ``[web]`` over the shared web core (``app.WebApp``).

A user logs in with the mail account's address and password (``login.WebLogin`` over the
server's checker and POP3's failed-log-in throttle; a locked or absent mailbox is refused like
a wrong password). Their folders are the IMAP folders (``store.folders``: INBOX, Sent, Drafts,
Trash, Junk and their own), made at the first log-in as IMAP does. Pages:

- ``/folder/NAME?page=N``: the folder's messages, newest first, ``web.page_size`` a page
  (from, subject, date, size; unread ones bold, from the Maildir ``S`` flag), with select
  boxes for delete, move, mark read or unread;
- ``/msg/NAME/UID``: one message, its text part, or its HTML part in a sandboxed frame
  (``/msg/NAME/UID/body``, sanitised by nh3, ``sanitize.clean_html``; remote images only after
  "show images": ``?images=1``), the attachments (``/msg/NAME/UID/part/N``: downloaded with
  ``Content-Disposition: attachment`` and nosniff), reply, reply all, forward, delete (to
  Trash; in Trash, for good), move. Opening a message sets ``\\Seen`` as IMAP's FETCH BODY[]
  does (the file is renamed to ``:2,S``);
- ``/compose``: plain-text mail with attachments (multipart/form-data), replies (quoted,
  In-Reply-To and References), forwards (attached whole or inline); sent through the
  ``interfaces.IMessageSubmission`` (the SMTP submission path: sender ownership, relay rules,
  DKIM) and saved to Sent; "save draft" stores it in Drafts;
- ``/settings``: the out-of-office reply and filing rules (``mailrules``: a Sieve script);
- ``/logout`` (a POST with the CSRF token).

Everything that touches files, and everything that costs CPU in proportion to a message
(MIME parsing, HTML sanitising, building a message to send), runs in the reactor's thread pool
(``run_blocking``): a hostile message may cost its reader a second, never the POP3, SMTP and
IMAP sessions the main process serves meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import time
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from pop3coexist.errors import AuthUnavailable, MailError, NoSuchMailbox, StoreError
from pop3coexist.identity.logins import login_locked
from pop3coexist.store.folders import FolderError, MaildirFolders
from pop3coexist.web import compose, mailrules, mailview, sanitize
from pop3coexist.web.app import Response, WebApp, WebRequest, redirect
from pop3coexist.web.budget import ByteBudget
from pop3coexist.web.login import LoginFailed, LoginUnavailable, WebLogin
from pop3coexist.web.render import Renderer

log = Logger()
HERE = Path(__file__).parent
HEAD_BYTES = 32 * 1024  # a folder list reads at most this much of each message
SPECIAL_ORDER = ["INBOX", "Drafts", "Sent", "Junk", "Trash"]


def display_name(name: str) -> str:
    """An IMAP folder name (modified UTF-7, ``.`` between levels) as a person reads it."""
    import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

    try:
        text = name.encode("ascii").decode("imap4-utf-7")
    except (UnicodeError, LookupError):
        text = name
    return text.replace(".", " / ")


def folder_url(name: str) -> str:
    return "/folder/" + urllib.parse.quote(name, safe="")


def msg_url(name: str, uid: int) -> str:
    return f"/msg/{urllib.parse.quote(name, safe='')}/{uid}"


def human_size(n: int) -> str:
    """``n`` octets as "812 B", "4 KB", "1.2 MB"."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{math.ceil(n / 1024)} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def short_date(ts: float | None, now: float) -> str:
    """A list's date: the time today, else day and month, else the full date."""
    if ts is None:
        return ""
    t, n = time.localtime(ts), time.localtime(now)
    if t[:3] == n[:3]:
        return time.strftime("%H:%M", t)
    if t.tm_year == n.tm_year:
        return time.strftime("%d %b", t)
    return time.strftime("%Y-%m-%d", t)


class WebMail(WebApp):
    """The web mail site (see the module docstring).

    ``store``: the ``MaildirStore``; ``checker``: the server's ``IAccountChecker``;
    ``throttle``: POP3's ``IAuthThrottle`` (web failures count where POP3's do);
    ``submission``: an ``IMessageSubmission``; ``sessions``: a ``sessions.SessionStore``.
    """

    def __init__(self, config: Any, store: Any, checker: Any, throttle: Any, submission: Any,
                 sessions: Any, reactor: Any, run_blocking: Any = None, sieve: Any = None) -> None:
        super().__init__(sessions, Renderer(HERE / "templates" / "mail",
                                            globals={"site_title": "Mail",
                                                     "folder_url": folder_url,
                                                     "msg_url": msg_url,
                                                     "display_name": display_name,
                                                     "human_size": human_size}),
                         checker=checker, still_allowed=self._still_open,
                         recheck=config.web.session_recheck)
        self.config = config
        self.store = store
        self.folders = MaildirFolders(store)
        self.submission = submission
        self.reactor = reactor
        self.hostname = config.server.hostname
        self.page_size = config.web.page_size
        if run_blocking is None:
            def run_blocking(f: Any, *args: Any) -> defer.Deferred:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
        self.run_blocking = run_blocking
        if sieve is None:
            from pop3coexist.store.sievestore import SieveScripts

            sieve = SieveScripts(store)
        self.sieve = sieve
        self.parse_budget = ByteBudget(config.web.parse_budget)
        self.login = WebLogin(checker, throttle, reactor, allowed=self._may_log_in,
                              name="web mail")
        self._summaries: OrderedDict[tuple[str, str], mailview.Summary] = OrderedDict()
        r = self.route
        r("GET", "/login", self.login_page, auth=False)
        r("POST", "/login", self.do_login, auth=False)
        r("POST", "/logout", self.do_logout, auth=False)
        r("GET", "/", self.home)
        r("GET", "/folder/(?P<folder>[^/]+)", self.folder_page)
        r("POST", "/folder/(?P<folder>[^/]+)/action", self.folder_action)
        r("GET", "/msg/(?P<folder>[^/]+)/(?P<uid>[0-9]{1,10})", self.message_page)
        r("GET", "/msg/(?P<folder>[^/]+)/(?P<uid>[0-9]{1,10})/body", self.message_body)
        r("GET", "/msg/(?P<folder>[^/]+)/(?P<uid>[0-9]{1,10})/part/(?P<n>[0-9]{1,4})",
          self.message_part)
        r("POST", "/msg/(?P<folder>[^/]+)/(?P<uid>[0-9]{1,10})/action", self.message_action)
        r("GET", "/compose", self.compose_page)
        r("POST", "/compose", self.do_compose)
        r("GET", "/settings", self.settings_page)
        r("POST", "/settings", self.do_settings)

    # -- accounts

    def _may_log_in(self, account: str) -> defer.Deferred:
        return self.run_blocking(self._open_for_login, account)

    def _still_open(self, account: str) -> defer.Deferred:
        """For a session's re-check: the mailbox still exists and is not locked."""
        return self.run_blocking(self._mailbox_open, account)

    def _mailbox_open(self, account: str) -> bool:
        box, _, domain = account.rpartition("@")
        try:
            if not self.store.mailbox_exists(domain, box):
                return False
        except (NoSuchMailbox, ValueError):
            return False
        return not login_locked(self.store, account)

    def _open_for_login(self, account: str) -> bool:
        if not self._mailbox_open(account):
            return False
        box, _, domain = account.rpartition("@")
        self.folders.open_account(domain, box).ensure_special_folders()
        return True

    def _account(self, req: WebRequest) -> Any:
        box, _, domain = (req.user or "").rpartition("@")
        return self.folders.open_account(domain, box)

    def _side(self, account: Any) -> list[dict[str, Any]]:
        """The folder list with unread counts (blocking)."""
        names = account.list_folders()
        ordered = [n for n in SPECIAL_ORDER if n in names] + \
            [n for n in names if n not in SPECIAL_ORDER]
        out = []
        for name in ordered:
            unread = 0
            with contextlib.suppress(StoreError, OSError):
                unread = sum(1 for m in account.open_folder(name).sync()
                             if "\\Seen" not in m.flags)
            out.append({"name": name, "label": display_name(name), "unread": unread})
        return out

    def mail_page(self, req: WebRequest, template: str, account: Any, folders: list,
                  status: int = 200, **context: Any) -> Response:
        context.setdefault("current", "")
        return self.page(req, template, status, folders=folders, **context)

    # -- notices and the account's standing

    def flash_redirect(self, req: WebRequest, location: str, notice: str) -> Response:
        """A redirect to ``location`` whose page shows ``notice`` once. The notice travels in
        the session, never in the URL: a link cannot make our pages say an attacker's words
        (content spoofing), and nothing of it lands in logs or history."""
        if req.session is not None:
            req.session.data["notice"] = notice[:400]
        return redirect(location)

    def notice(self, req: WebRequest) -> str:
        """The notice a ``flash_redirect`` left for this page (shown once), or ""."""
        return req.session.data.pop("notice", "") if req.session is not None else ""

    def route(self, method: str, pattern: str, handler: Any, auth: bool = True) -> None:
        """WebApp.route; a logged-in route first checks that the mailbox still exists and is
        not locked (two small reads, off the reactor): locking a mailbox or its domain, or
        removing it, ends its web sessions at their next request, not only new log-ins."""
        if auth:
            handler = self._guarded(handler)
        super().route(method, pattern, handler, auth)

    def _guarded(self, handler: Any) -> Any:
        async def guarded(req: WebRequest, **kw: Any) -> Response:
            if req.user and not await self.run_blocking(self._still_open, req.user):
                log.info("web mail: {user} logged out: the mailbox is locked or gone",
                         user=req.user)
                self.log_out(req)
                return redirect(self.login_path)
            return await handler(req, **kw)

        return guarded

    def _still_open(self, account: str) -> bool:
        box, _, domain = account.rpartition("@")
        try:
            return bool(self.store.mailbox_exists(domain, box)) and \
                not login_locked(self.store, account)
        except (NoSuchMailbox, ValueError, StoreError, OSError):
            return False
        except AuthUnavailable:  # the store cannot be read now: keep the session
            return True

    # -- log-in and log-out

    async def login_page(self, req: WebRequest) -> Response:
        if req.user:
            return redirect("/")
        return self.page(req, "login.html", error="", name="")

    async def do_login(self, req: WebRequest) -> Response:
        # the form only: a user name or password in the query string (a URL, logged and kept
        # in history) is not read
        name = (req.form.get("username") or [""])[0].strip()
        password = (req.form.get("password") or [""])[0]
        try:
            account = await self.login.authenticate(name, password, req.peer)
        except LoginFailed:
            return self.page(req, "login.html", 403, name=name,
                             error="The address or password is not right, or the mailbox "
                                   "is locked.")
        except LoginUnavailable:
            return self.page(req, "login.html", 503, name=name,
                             error="The accounts cannot be checked right now. Try again in a "
                                   "minute.")
        if not await self.log_in(req, account):
            return self.page(req, "login.html", 403, name=name,
                             error="The address or password is not right, or the mailbox "
                                   "is locked.")
        return redirect("/")

    async def do_logout(self, req: WebRequest) -> Response:
        self.log_out(req)
        return redirect("/login")

    async def home(self, req: WebRequest) -> Response:
        return redirect(folder_url("INBOX"))

    # -- folders

    def _folder_name(self, raw: str) -> str:
        return urllib.parse.unquote(raw)

    def _list(self, account: Any, name: str, page: int) -> dict[str, Any]:
        """Blocking: one page of a folder, newest first."""
        view = account.open_folder(name)
        msgs = sorted(view.sync(), key=lambda m: (m.internaldate, m.uid), reverse=True)
        pages = max(1, math.ceil(len(msgs) / self.page_size))
        page = min(max(page, 1), pages)
        rows = []
        now = time.time()
        for m in msgs[(page - 1) * self.page_size: page * self.page_size]:
            s = self._summary(view, m)
            rows.append({"uid": m.uid, "from": s.from_ or "(no sender)",
                         "subject": s.subject or "(no subject)",
                         "date": short_date(s.timestamp or m.internaldate, now),
                         "size": human_size(view.size(m)),
                         "unread": "\\Seen" not in m.flags,
                         "answered": "\\Answered" in m.flags,
                         "flagged": "\\Flagged" in m.flags})
        return {"rows": rows, "page": page, "pages": pages, "total": len(msgs),
                "folders": self._side(account)}

    def _summary(self, view: Any, m: Any) -> mailview.Summary:
        key = (str(view.path), m.unique)
        s = self._summaries.get(key)
        if s is None:
            try:
                with view.open(m) as f:
                    head = f.read(HEAD_BYTES)
            except (StoreError, OSError):
                head = b""
            end = head.find(b"\n\n") if b"\r\n\r\n" not in head else head.find(b"\r\n\r\n")
            s = mailview.summary(head[:end] if end >= 0 else head)
            self._summaries[key] = s
            if len(self._summaries) > 20000:
                self._summaries.popitem(last=False)
        return s

    async def folder_page(self, req: WebRequest, folder: str) -> Response:
        name = self._folder_name(folder)
        account = self._account(req)
        if not account.exists(name):
            return self.error_page(req, 404, "There is no such folder.")
        try:
            page = int(req.arg("page", "1"))
        except ValueError:
            page = 1
        data = await self.run_blocking(self._list, account, name, page)
        moves = [f for f in data["folders"] if f["name"] != name]
        return self.mail_page(req, "folder.html", account, data["folders"], current=name,
                              moves=moves, notice=self.notice(req), **{
                                  k: v for k, v in data.items() if k != "folders"})

    def _find(self, view: Any, uid: int) -> Any:
        for m in view.sync():
            if m.uid == uid:
                return m
        return None

    def _delete_or_move(self, account: Any, name: str, uids: list[int], action: str,
                        target: str) -> int:
        """Blocking: delete (to Trash, or for good in Trash), move, mark read or unread;
        returns how many messages it changed."""
        view = account.open_folder(name)
        msgs = [m for m in view.sync() if m.uid in set(uids)]
        if not msgs:
            return 0
        if action in ("read", "unread"):
            for m in msgs:
                flags = set(m.flags)
                flags.discard("\\Recent")
                if action == "read":
                    flags.add("\\Seen")
                else:
                    flags.discard("\\Seen")
                with contextlib.suppress(StoreError):
                    view.set_flags(m, flags)
            return len(msgs)
        if action == "delete":
            if name == "Trash":
                view.expunge(msgs)
                return len(msgs)
            target = "Trash"
            account.ensure_special_folders()
        if action in ("delete", "move"):
            if target == name or not account.exists(target):
                raise FolderError("choose another folder")
            view.copy_to(msgs, account.open_folder(target))
            view.expunge(msgs)
            return len(msgs)
        raise FolderError("unknown action")

    async def folder_action(self, req: WebRequest, folder: str) -> Response:
        name = self._folder_name(folder)
        account = self._account(req)
        uids = [int(u) for u in req.args("uid") if u.isascii() and u.isdigit()]
        action = req.arg("action")
        try:
            n = await self.run_blocking(self._delete_or_move, account, name, uids, action,
                                        req.arg("target"))
        except FolderError as e:
            return self.flash_redirect(req, folder_url(name), str(e))
        note = {"delete": "deleted" if name != "Trash" else "deleted for good",
                "move": "moved", "read": "marked read", "unread": "marked unread"}.get(action,
                                                                                      "changed")
        return self.flash_redirect(req, folder_url(name),
                                   f"{n} message{'s' if n != 1 else ''} {note}")

    # -- one message

    def _read(self, account: Any, name: str, uid: int, mark_seen: bool) -> Any:
        """Blocking: (bytes, the side list) of a message, setting \\Seen; None when gone."""
        view = account.open_folder(name)
        m = self._find(view, uid)
        if m is None:
            return None
        try:
            with view.open(m) as f:
                data = f.read()
        except StoreError:
            return None
        if mark_seen and "\\Seen" not in m.flags:
            flags = set(m.flags) - {"\\Recent"}
            flags.add("\\Seen")
            with contextlib.suppress(StoreError):
                view.set_flags(m, flags)
        return data

    @staticmethod
    def _view(data: bytes) -> tuple[mailview.MessageView, int]:
        """Blocking (CPU): the message's view and how many remote images its HTML has."""
        view = mailview.parse_message(data)
        blocked = sanitize.clean_html(view.html, False).blocked if view.html is not None else 0
        return view, blocked

    @staticmethod
    def _frame(data: bytes, images: bool) -> bytes:
        """Blocking (CPU): the page of the message frame, its HTML part sanitised."""
        view = mailview.parse_message(data)
        inline = mailview.cid_images(data) if view.cid else {}
        cleaned = sanitize.clean_html(view.html or "", images, inline.get)
        return ("<!doctype html><html><head><meta charset=\"utf-8\">"
                "<meta name=\"referrer\" content=\"no-referrer\"></head><body>"
                + cleaned.html + "</body></html>").encode("utf-8")

    async def message_page(self, req: WebRequest, folder: str, uid: str) -> Response:
        name = self._folder_name(folder)
        account = self._account(req)
        if not account.exists(name):
            return self.error_page(req, 404, "There is no such folder.")
        data = await self.run_blocking(self._read, account, name, int(uid), True)
        if data is None:
            return self.error_page(req, 404, "This message is no longer in the folder.")
        folders = await self.run_blocking(self._side, account)
        async with self.parse_budget.taking(len(data)):
            view, blocked = await self.run_blocking(self._view, data)
        images = req.arg("images") == "1"
        moves = [f for f in folders if f["name"] != name]
        return self.mail_page(req, "message.html", account, folders, current=name,
                              uid=int(uid), m=view, images=images, blocked=blocked,
                              show_html=view.html is not None and req.arg("plain") != "1",
                              moves=moves, notice=self.notice(req))

    async def message_body(self, req: WebRequest, folder: str, uid: str) -> Response:
        """The sanitised HTML part, for the sandboxed frame of the message page."""
        name = self._folder_name(folder)
        account = self._account(req)
        if not account.exists(name):
            return self.error_page(req, 404, "There is no such folder.")
        data = await self.run_blocking(self._read, account, name, int(uid), False)
        if data is None:
            return self.error_page(req, 404, "This message is no longer in the folder.")
        images = req.arg("images") == "1"
        async with self.parse_budget.taking(len(data)):
            page = await self.run_blocking(self._frame, data, images)
        return Response(page, csp=sanitize.frame_csp(images), frame=True,
                        headers={b"Referrer-Policy": b"no-referrer"})

    async def message_part(self, req: WebRequest, folder: str, uid: str, n: str) -> Response:
        """An attachment: Content-Disposition attachment (inline only for an image that the
        HTML part shows), its own type, nosniff, a CSP that runs nothing."""
        name = self._folder_name(folder)
        account = self._account(req)
        if not account.exists(name):
            return self.error_page(req, 404, "There is no such folder.")
        data = await self.run_blocking(self._read, account, name, int(uid), False)
        found = None
        if data is not None:
            async with self.parse_budget.taking(len(data)):
                found = await self.run_blocking(mailview.part, data, int(n))
        if found is None:
            return self.error_page(req, 404, "There is no such attachment.")
        content, ctype, filename = found
        inline = req.arg("inline") == "1" and ctype in ("image/png", "image/gif", "image/jpeg",
                                                        "image/webp")
        quoted = urllib.parse.quote(filename, safe="")
        ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_")
        disposition = (f"{'inline' if inline else 'attachment'}; filename=\"{ascii_name}\"; "
                       f"filename*=UTF-8''{quoted}")
        if not inline and ctype.startswith("text/"):
            ctype = ctype + "; charset=utf-8" if ctype == "text/plain" else ctype
        return Response(content, content_type=ctype if "\n" not in ctype else
                        "application/octet-stream",
                        csp="default-src 'none'; sandbox; frame-ancestors 'self'",
                        frame=inline,
                        headers={b"Content-Disposition": disposition.encode("ascii")})

    async def message_action(self, req: WebRequest, folder: str, uid: str) -> Response:
        name = self._folder_name(folder)
        account = self._account(req)
        action = req.arg("action")
        try:
            await self.run_blocking(self._delete_or_move, account, name, [int(uid)], action,
                                    req.arg("target"))
        except FolderError as e:
            return self.flash_redirect(req, msg_url(name, int(uid)), str(e))
        if action in ("read", "unread"):
            return redirect(folder_url(name))
        note = "Message moved" if action == "move" else "Message deleted"
        return self.flash_redirect(req, folder_url(name), note)

    # -- compose and send

    async def compose_page(self, req: WebRequest) -> Response:
        account = self._account(req)
        fields = {"to": req.arg("to"), "cc": "", "bcc": "", "subject": "", "body": "",
                  "in_reply_to": "", "references": ""}
        source = ""
        for kind in ("reply", "forward"):
            ref = req.arg(kind)
            if not ref:
                continue
            fname, _, uid = ref.rpartition("/")
            if not (uid.isascii() and uid.isdigit()) or not account.exists(fname):
                return self.error_page(req, 404, "There is no such message.")
            data = await self.run_blocking(self._read, account, fname, int(uid), False)
            if data is None:
                return self.error_page(req, 404, "This message is no longer in the folder.")
            async with self.parse_budget.taking(len(data)):
                view = await self.run_blocking(mailview.parse_message, data)
            if kind == "reply":
                fields.update(await self.run_blocking(compose.reply_fields, view,
                                                      req.user or "", req.arg("all") == "1"))
            else:
                inline = req.arg("inline") == "1"
                fields.update(await self.run_blocking(compose.forward_fields, view, inline))
                if not inline:
                    source = ref
            fields["source"] = ref
        folders = await self.run_blocking(self._side, account)
        return self.mail_page(req, "compose.html", account, folders, current="", f=fields,
                              attach_source=source, reply_source=req.arg("reply"),
                              max_upload=human_size(self.config.web.max_upload))

    async def do_compose(self, req: WebRequest) -> Response:
        account = self._account(req)
        f = {k: req.arg(k) for k in ("to", "cc", "bcc", "subject", "body", "in_reply_to",
                                     "references")}
        attach_source = req.arg("attach_source")
        reply_source = req.arg("reply_source")
        forwarded = None
        if attach_source:
            fname, _, uid = attach_source.rpartition("/")
            if uid.isascii() and uid.isdigit() and account.exists(fname):
                forwarded = await self.run_blocking(self._read, account, fname, int(uid), False)
        uploads = [(u.filename, u.content_type, u.data) for u in req.files if u.filename]
        draft = req.arg("send") == "draft"

        async def again(error: str, status: int = 400) -> Response:
            folders = await self.run_blocking(self._side, account)
            return self.mail_page(req, "compose.html", account, folders, status, current="",
                                  f=f, attach_source=attach_source, reply_source=reply_source,
                                  error=error, max_upload=human_size(self.config.web.max_upload))

        def build() -> tuple[list[str], bytes]:
            rcpts = compose.parse_recipients(f["to"], f["cc"], f["bcc"])
            if not rcpts and not draft:
                raise compose.ComposeError("Add at least one recipient.")
            msg = compose.build_message(
                sender=req.user or "", to=f["to"], cc=f["cc"], subject=f["subject"],
                body=f["body"], hostname=self.hostname, in_reply_to=f["in_reply_to"],
                references=f["references"], attachments=uploads, forwarded=forwarded)
            return rcpts, msg.as_bytes()

        try:
            rcpts, data = await self.run_blocking(build)
        except (compose.ComposeError, ValueError) as e:
            return await again(str(e))
        if draft:
            await self.run_blocking(self._store_copy, account, "Drafts", data, ["\\Seen",
                                                                                "\\Draft"])
            return self.flash_redirect(req, folder_url("Drafts"), "Draft saved")
        try:
            result = await self.submission.submit(req.user, req.user, rcpts, data, req.peer)
        except MailError as e:
            log.info("web mail: {user} could not send: {code} {text}", user=req.user,
                     code=e.code, text=e.text)
            return await again(f"Not sent: {e.code} {e.enhanced} {e.text}".strip(),
                               422 if not e.temporary else 503)
        await self.run_blocking(self._store_copy, account, "Sent", data, ["\\Seen"])
        if reply_source:
            await self.run_blocking(self._mark_answered, account, reply_source)
        note = f"Message sent (queue id {result.queue_id})"
        if result.refused:
            note += "; refused: " + "; ".join(f"{a}: {why}" for a, why in result.refused.items())
        return self.flash_redirect(req, folder_url("INBOX"), note)

    def _store_copy(self, account: Any, name: str, data: bytes, flags: list[str]) -> None:
        account.ensure_special_folders()
        account.open_folder(name).add(data, flags, time.time())

    def _mark_answered(self, account: Any, ref: str) -> None:
        fname, _, uid = ref.rpartition("/")
        if not (uid.isascii() and uid.isdigit()) or not account.exists(fname):
            return
        view = account.open_folder(fname)
        m = self._find(view, int(uid))
        if m is not None:
            with contextlib.suppress(StoreError):
                view.set_flags(m, (set(m.flags) - {"\\Recent"}) | {"\\Answered"})

    # -- settings: out-of-office and rules

    async def settings_page(self, req: WebRequest) -> Response:
        account = self._account(req)
        settings, other = await self.run_blocking(mailrules.load, self.sieve, account.domain,
                                                  account.mailbox)
        folders = await self.run_blocking(self._side, account)
        return self.mail_page(req, "settings.html", account, folders, s=settings,
                              other_active=other, notice=self.notice(req),
                              actions=mailrules.ACTIONS, problems=[])

    async def do_settings(self, req: WebRequest) -> Response:
        account = self._account(req)
        try:
            days = int(req.arg("days", "7") or "7")
        except ValueError:
            days = 0
        rules = []
        fields_, texts, actions, targets = (req.args("rule_field"), req.args("rule_text"),
                                            req.args("rule_action"), req.args("rule_target"))
        for fld, text, action, target in zip(fields_, texts, actions, targets, strict=False):
            if not text.strip() and not target.strip():
                continue  # an empty row
            rules.append(mailrules.Rule(fld, text.strip(), action, target.strip()))
        s = mailrules.Settings(vacation=req.arg("vacation") == "on",
                               subject=req.arg("subject").strip(), text=req.arg("text"),
                               days=days, rules=rules)

        def address_ok(text: str) -> bool:
            try:
                return len(compose.parse_recipients(text)) == 1
            except compose.ComposeError:
                return False

        for r in s.rules:  # forward to the address as the envelope takes it (A-labels)
            if r.action.startswith("redirect") and address_ok(r.target):
                r.target = compose.parse_recipients(r.target)[0]
        problems = mailrules.validate(s, account.exists, address_ok)
        if problems:
            folders = await self.run_blocking(self._side, account)
            return self.mail_page(req, "settings.html", account, folders, 400, s=s,
                                  other_active=None, notice="", actions=mailrules.ACTIONS,
                                  problems=problems)
        replaced = await self.run_blocking(mailrules.save, self.sieve, account.domain,
                                           account.mailbox, s)
        log.info("web mail: {user} saved settings (out-of-office {state}, {n} rules)",
                 user=req.user, state="on" if s.vacation else "off", n=len(s.rules))
        note = "Settings saved"
        if replaced:
            note += f" (they replace the active script {replaced!r})"
        return self.flash_redirect(req, "/settings", note)
