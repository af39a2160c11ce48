"""The soak with faults (issue 16 item 2): load, a fault schedule, then an audit of every message.

    python soak/run.py [--duration 600] [--fraction 0.7] [--rate N] [--pop3-clients 8]
                       [--faults worker,main,disk,slapd,smarthost,loris] [--json FILE]

Everything runs on this machine, on loopback ports the OS picked, in a temporary folder that
is removed at the end (``--keep`` keeps it); it needs root (a size-limited tmpfs for the state
folder, slapd). The parts:

- the real server (twistd, ``server.workers = 2``) with ``auth.method = "directory"`` against
  a private slapd (tests/support/slapd.py), its state folder on a tmpfs of ``--state-mb``;
  relay domain ``relay.soak.test`` routed to an aiosmtpd smart host (tests/support/
  smarthost.py), queue retries every few seconds;
- SMTP in: Postfix's ``smtp-source`` (background load to one mailbox, counted) and tracked
  senders (threads, a small SMTP client) that give every message a unique Message-ID and
  record the reply after the final dot: 250, 4xx, 5xx, or none (the connection died after
  the dot: such a message may or may not have been taken, and may arrive twice);
- POP3 out: ``--pop3-clients`` threads that log in to the three mailboxes, RETR + DELE every
  message and QUIT; a message counts as retrieved when the QUIT that commits the DELE got +OK;
- the rate: ``--fraction`` (0.7) of the acceptance rate measured first (``smtp-source``, 20
  sessions, 5 s), or ``--rate`` messages/s; about 20% of tracked messages go to the relay
  domain;
- the fault schedule (each one once, at fixed fractions of the run): kill -9 of a worker (the
  server replaces it), slow-loris clients holding ``max_connections_per_client`` connections,
  the smart host down, slapd stopped, the state file system full (a ballast file; the server
  must answer ``452 4.3.1`` and accept again when space returns), kill -9 of the main process
  (restarted at once on the same state).

Afterwards the smart host is up again, the load stops, the queue drains and the POP3 clients
empty the mailboxes (with deadlines), the server stops cleanly, and the audit checks: every
message that got a 250 is in exactly one place (a mailbox, the queue, the smart host, or
retrieved by POP3), none lost; after-dot disconnects are counted apart (found 0, 1 or 2
times); RSS (main + workers) sampled every 2 s is flat: the median of the last third of the
samples of the longest process epoch is at most 1.25 x the first third's + 20 MB; no file is
left in any Maildir ``tmp/`` or in the spool. Prints the table, writes JSON, exits 1 when any
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.server import HOSTNAME, ServerProcess  # noqa: E402
from tests.support.slapd import BASE_DN, DIRECTORY_USERS, SERVICE_DN, Slapd  # noqa: E402
from tests.support.smarthost import SmartHost  # noqa: E402

RELAY_DOMAIN = "relay.soak.test"
BOXES = ("ted", "kim")  # dora is a disabled account in the test directory
LOAD_BOX = "kim"  # smtp-source's messages
FAULTS = ("worker", "loris", "smarthost", "slapd", "disk", "main")
MSGID = re.compile(rb"^Message-ID: <(soak-\d+)@soak\.test>", re.M | re.I)


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------- the server


@dataclass
class Rig:
    """The server, its peers and the shared state the load threads read."""

    root: Path
    state_mb: int
    srv: ServerProcess | None = None
    slapd: Slapd | None = None
    smarthost: SmartHost | None = None
    mounted: bool = False
    epoch: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def port(self, role: str) -> int:
        with self.lock:
            assert self.srv is not None
            return self.srv.port(role)

    @property
    def state(self) -> Path:
        return self.root / "var"

    def setup(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.state_mb}m,mode=0755",
                            "tmpfs", str(self.state)], check=True, capture_output=True)
            self.mounted = True
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"no tmpfs for the state folder ({e}): the disk-full fault is skipped")
        (self.root / "slapd").mkdir()
        self.slapd = Slapd(self.root / "slapd")
        self.slapd.start()
        self.smarthost = SmartHost().start()
        method = (
            '[auth]\nmethod = "directory"\napop = false\n'
            f'[auth.directory]\nurl = "{self.slapd.url}"\nbase_dn = "{BASE_DN}"\n'
            f'bind_dn = "{SERVICE_DN}"\nbind_password_file = "{self.slapd.secret_file}"\n'
            'timeout = "3s"\n'
        )
        extra = (
            f'[[domains.remote]]\nname = "{RELAY_DOMAIN}"\nrelay = true\n'
            f'route = "[127.0.0.1]:{self.smarthost.port}"\n'
            '[smarthost]\ntls = "none"\nconnect_timeout = "3s"\ncommand_timeout = "30s"\n'
            '[queue]\nretry_intervals = ["3s", "5s", "10s"]\n'
        )
        self.srv = ServerProcess(self.root, tls=False, method_config=method,
                                 server_config="workers = 2", extra_config=extra,
                                 smtp_config="max_messages_per_connection = 1000\n"
                                             "max_connections_per_client = 40",
                                 pop3_config="max_connections_per_client = 40")
        self.srv.write_config()  # state_dir = ../var: self.state, the tmpfs
        for box in BOXES:
            self.srv.admin("mailbox", "add", f"{box}@{HOSTNAME}")
        self.srv.start()

    def workers(self) -> list[int]:
        """The worker processes now running: children of the main process (by /proc)."""
        main = self.srv.proc.pid if self.srv is not None and self.srv.proc is not None else None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(") ", 1)[1].split()
            if b"pop3coexist.worker" in cmd and fields[0] != "Z" and (
                    main is None or int(fields[1]) == main):
                found.append(int(entry.name))
        return found

    def restart_after_kill(self) -> None:
        """kill -9 of the main process, then a start on the same state."""
        assert self.srv is not None and self.srv.proc is not None
        old_workers = self.workers()
        with self.lock:
            self.srv.proc.send_signal(signal.SIGKILL)
            self.srv.proc.wait(30)
            self.srv.proc = None
            deadline = time.monotonic() + 30
            while any(_alive(p) for p in old_workers) and time.monotonic() < deadline:
                time.sleep(0.1)  # the workers notice their parent is gone and stop
            self.srv.start()
            self.epoch += 1

    def teardown(self) -> None:
        if self.smarthost is not None:
            self.smarthost.stop()
        if self.slapd is not None:
            self.slapd.stop()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.state)], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---------------------------------------------------------------------- clients


class Lines:
    """A tiny line-oriented client socket."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def line(self) -> bytes:
        got = self.f.readline()
        if not got:
            raise ConnectionError("connection closed")
        return got

    def reply(self) -> bytes:
        """An SMTP reply (last line of a multi-line one)."""
        while True:
            got = self.line()
            if got[3:4] != b"-":
                return got

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


@dataclass
class Ledger:
    """What the clients saw, by message id."""

    outcome: dict[str, str] = field(default_factory=dict)  # id -> ok|temp|perm|unknown|error
    why: dict[str, str] = field(default_factory=dict)  # id -> the refusing reply or error
    rcpt: dict[str, str] = field(default_factory=dict)
    retrieved: dict[str, int] = field(default_factory=dict)  # committed by QUIT +OK
    replies: dict[str, int] = field(default_factory=dict)  # reply code after the dot -> count
    disk_full_replies: int = 0
    pop3_sessions: int = 0
    pop3_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, mid: str, outcome: str, rcpt: str, code: str = "", why: str = "") -> None:
        with self.lock:
            self.outcome[mid] = outcome
            if why:
                self.why[mid] = why
            self.rcpt[mid] = rcpt
            if code:
                self.replies[code] = self.replies.get(code, 0) + 1


def message(mid: str, rcpt: str, size: int = 2048) -> bytes:
    body = (f"line of soak message {mid} " * 4 + "\r\n") * (size // 100)
    return (f"From: load@client.soak.test\r\nTo: <{rcpt}>\r\nSubject: {mid}\r\n"
            f"Message-ID: <{mid}@soak.test>\r\n\r\n{body}").encode()


def send_one(port: int, mid: str, rcpt: str, ledger: Ledger) -> None:
    """One SMTP transaction; the outcome after the final dot goes to the ledger."""
    dot_sent = False
    conn = None
    try:
        conn = Lines(port)
        if not conn.reply().startswith(b"220"):
            ledger.note(mid, "temp", rcpt)
            return
        for cmd in (b"EHLO client.soak.test", b"MAIL FROM:<load@client.soak.test>",
                    f"RCPT TO:<{rcpt}>".encode(), b"DATA"):
            conn.send(cmd + b"\r\n")
            reply = conn.reply()
            if reply[:1] not in (b"2", b"3"):
                code = reply[:3].decode(errors="replace")
                if reply.startswith(b"452") and b"4.3.1" in reply:
                    with ledger.lock:
                        ledger.disk_full_replies += 1
                ledger.note(mid, "temp" if reply[:1] == b"4" else "perm", rcpt, code,
                            f"{cmd.split(b':')[0].decode()}: {reply.decode(errors='replace').strip()}")
                return
        conn.send(message(mid, rcpt) + b"\r\n.\r\n")
        dot_sent = True
        reply = conn.reply()
        code = reply[:3].decode(errors="replace")
        if reply.startswith(b"250"):
            ledger.note(mid, "ok", rcpt, code)
        else:
            if reply.startswith(b"452") and b"4.3.1" in reply:
                with ledger.lock:
                    ledger.disk_full_replies += 1
            ledger.note(mid, "temp" if reply[:1] == b"4" else "perm", rcpt, code,
                        "after the dot: " + reply.decode(errors="replace").strip())
        conn.send(b"QUIT\r\n")
    except (OSError, ConnectionError) as e:
        ledger.note(mid, "unknown" if dot_sent else "error", rcpt, why=f"{e.__class__.__name__}: {e}")
    finally:
        if conn is not None:
            conn.close()


class Pacer:
    """Hands out send slots at ``rate`` per second to any number of threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self, stop: threading.Event) -> bool:
        with self.lock:
            slot = max(self.next, time.monotonic())
            self.next = slot + self.interval
        delay = slot - time.monotonic()
        return not (delay > 0 and stop.wait(delay))


def sender(rig: Rig, ledger: Ledger, pacer: Pacer, stop: threading.Event, counter, seed: int) -> None:
    rnd = random.Random(seed)
    while pacer.wait(stop) and not stop.is_set():
        with ledger.lock:
            mid = f"soak-{next(counter)}"
        if rnd.random() < 0.2:
            rcpt = f"user{rnd.randrange(100)}@{RELAY_DOMAIN}"
        else:
            rcpt = f"{rnd.choice(('ted', 'kim'))}@{HOSTNAME}"
        try:
            port = rig.port("smtp")
        except (AssertionError, KeyError):
            continue
        send_one(port, mid, rcpt, ledger)


def pop3_client(rig: Rig, ledger: Ledger, stop: threading.Event, seed: int) -> None:
    rnd = random.Random(seed)
    while not stop.is_set():
        box = rnd.choice(BOXES)
        user = DIRECTORY_USERS[box]
        got: list[str] = []
        conn = None
        try:
            conn = Lines(rig.port("pop3"))
            conn.line()
            conn.send(f"USER {box}@{HOSTNAME}\r\n".encode())
            conn.line()
            conn.send(f"PASS {user.password}\r\n".encode())
            if not conn.line().startswith(b"+OK"):
                conn.send(b"QUIT\r\n")
                stop.wait(0.2)
                continue
            conn.send(b"STAT\r\n")
            count = int(conn.line().split()[1])
            for n in range(1, min(count, 50) + 1):
                conn.send(f"RETR {n}\r\n".encode())
                if not conn.line().startswith(b"+OK"):
                    continue
                data = bytearray()
                while True:
                    line = conn.line()
                    if line == b".\r\n":
                        break
                    data += line
                m = MSGID.search(bytes(data))
                conn.send(f"DELE {n}\r\n".encode())
                if conn.line().startswith(b"+OK") and m:
                    got.append(m.group(1).decode())
            conn.send(b"QUIT\r\n")
            if conn.line().startswith(b"+OK"):
                with ledger.lock:
                    ledger.pop3_sessions += 1
                    for mid in got:
                        ledger.retrieved[mid] = ledger.retrieved.get(mid, 0) + 1
            if count == 0:
                stop.wait(0.3)
        except (OSError, ConnectionError, ValueError, IndexError, AssertionError, KeyError):
            with ledger.lock:
                ledger.pop3_errors += 1
            stop.wait(0.2)
        finally:
            if conn is not None:
                conn.close()


def smtp_source_loop(rig: Rig, stop: threading.Event, sessions: int, sent: list[int]) -> None:
    """Postfix's smtp-source as background load to LOAD_BOX, restarted until ``stop``."""
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    while not stop.is_set():
        try:
            port = rig.port("smtp")
        except (AssertionError, KeyError):
            stop.wait(0.5)
            continue
        proc = subprocess.run(
            [exe, "-s", str(sessions), "-m", str(sessions * 5), "-w", "1", "-l", "2048",
             "-f", "source@client.soak.test", "-t", f"{LOAD_BOX}@{HOSTNAME}",
             f"127.0.0.1:{port}"], capture_output=True, timeout=300)
        if proc.returncode == 0:
            sent[0] += sessions * 5
        else:
            stop.wait(0.5)


def measure_rate(rig: Rig, seconds: float = 5.0) -> float:
    """Messages/s smtp-source gets accepted with 20 sessions for about ``seconds``."""
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    count = 400
    start = time.monotonic()
    subprocess.run([exe, "-s", "20", "-m", str(count), "-l", "2048", "-f", "cal@client.soak.test",
                    "-t", f"{LOAD_BOX}@{HOSTNAME}", f"127.0.0.1:{rig.port('smtp')}"],
                   capture_output=True, timeout=300, check=True)
    took = time.monotonic() - start
    return count / took


# ---------------------------------------------------------------------- faults


class Faults:
    """The fault schedule; each fault logs what it did and what the server answered."""

    def __init__(self, rig: Rig, ledger: Ledger, window: float) -> None:
        self.rig = rig
        self.ledger = ledger
        self.window = window  # how long an outage lasts
        self.done: list[dict] = []

    def run(self, name: str, stop: threading.Event) -> None:
        start = time.monotonic()
        try:
            note = getattr(self, name)(stop)
        except Exception as e:  # a fault that could not be injected is reported, not hidden
            note = f"FAILED to inject: {e.__class__.__name__}: {e}"
        self.done.append({"fault": name, "at": round(start - T0, 1),
                          "took": round(time.monotonic() - start, 1), "note": note})
        log(f"fault {name}: {note}")

    def worker(self, stop: threading.Event) -> str:
        main = self.rig.srv.proc.pid if self.rig.srv and self.rig.srv.proc else None
        victims = [p for p in self.rig.workers() if p != main]
        if not victims:
            return "no worker to kill"
        os.kill(victims[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = [p for p in self.rig.workers() if p != main]
            if now and victims[0] not in now and all(_alive(p) for p in now):
                return f"worker {victims[0]} killed, replaced by {now}"
            time.sleep(0.2)
        return f"worker {victims[0]} killed; no replacement seen in 30 s"

    def main(self, stop: threading.Event) -> str:
        old = self.rig.srv.proc.pid
        self.rig.restart_after_kill()
        return f"main process {old} killed with SIGKILL, restarted as {self.rig.srv.proc.pid}"

    def smarthost(self, stop: threading.Event) -> str:
        self.rig.smarthost.stop()
        stop.wait(self.window)
        self.rig.smarthost.start()
        return f"smart host down for {self.window:.0f} s, up again"

    def slapd(self, stop: threading.Event) -> str:
        self.rig.slapd.stop()
        stop.wait(min(self.window, 20))
        self.rig.slapd.start()
        return f"slapd stopped for {min(self.window, 20):.0f} s, restarted"

    def disk(self, stop: threading.Event) -> str:
        if not self.rig.mounted:
            return "skipped: no tmpfs"
        before = self.ledger.disk_full_replies
        end = time.monotonic() + min(self.window, 20)
        fills = []
        probe = ""
        try:
            n = 0
            while time.monotonic() < end and not stop.is_set():
                # top it up: the POP3 clients' deletions free space all the time
                n += 1
                path = self.rig.state / f"ballast.{n}"
                fills.append(path)
                try:
                    with open(path, "wb", buffering=0) as f:
                        for size in (1 << 20, 1 << 14, 1 << 10, 1 << 7):
                            while True:
                                try:
                                    f.write(b"\0" * size)
                                except OSError:
                                    break
                except OSError:
                    pass  # not even room for the file: full already
                if not probe:
                    mid = f"soak-{9_000_000_000 + int(time.time())}"
                    send_one(self.rig.port("smtp"), mid, f"ted@{HOSTNAME}", self.ledger)
                    probe = self.ledger.why.get(mid, self.ledger.outcome.get(mid, ""))
                stop.wait(0.2)
        finally:
            for path in fills:
                path.unlink(missing_ok=True)
        return (f"state file system full for {min(self.window, 20):.0f} s: "
                f"{self.ledger.disk_full_replies - before} replies 452 4.3.1 (probe: {probe})")

    def loris(self, stop: threading.Event) -> str:
        """Slow-loris clients: as many SMTP connections from one address as the server allows
        per client, each sending one byte every few seconds."""
        socks = []
        refused = 0
        for _ in range(45):  # past the per-client limit of 40
            try:
                s = socket.create_connection(("127.0.0.1", self.rig.port("smtp")), timeout=5)
                socks.append(s)
            except OSError:
                refused += 1
        end = time.monotonic() + min(self.window, 30)
        while time.monotonic() < end and not stop.is_set():
            for s in socks:
                try:
                    s.sendall(b"E")
                except OSError:
                    pass
            stop.wait(3)
        answered_421 = 0
        for s in socks:
            try:
                s.settimeout(0.5)
                if b"421" in s.recv(4096):
                    answered_421 += 1
            except OSError:
                pass
            s.close()
        return (f"{len(socks)} slow connections held {min(self.window, 30):.0f} s "
                f"({answered_421} of them told 421: past the per-client limit)")


# ---------------------------------------------------------------------- audit


def scan_files(folder: Path) -> dict[str, int]:
    """Message ids found in the files under ``folder`` -> how many files hold each."""
    found: dict[str, int] = {}
    if not folder.exists():
        return found
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for m in set(MSGID.findall(data)):
            key = m.decode()
            found[key] = found.get(key, 0) + 1
    return found


def audit(rig: Rig, ledger: Ledger, rss: list[tuple[int, float, float]],
          runner_killed: bool = False) -> dict:
    state = rig.state
    mailroot = state / "mailroot" / HOSTNAME
    in_box = {}
    for box in BOXES:
        for sub in ("new", "cur"):
            for k, v in scan_files(mailroot / box / sub).items():
                in_box[k] = in_box.get(k, 0) + v
    in_queue = scan_files(state / "queue")
    at_sink: dict[str, int] = {}
    for r in rig.smarthost.received:
        for m in set(MSGID.findall(r.content)):
            at_sink[m.decode()] = at_sink.get(m.decode(), 0) + 1
    rows = {"ok": 0, "lost": 0, "duplicated": 0, "resent_after_kill": 0, "in_mailbox": 0,
            "retrieved": 0, "in_queue": 0, "at_smarthost": 0}
    unknown = {"count": 0, "found_0": 0, "found_1": 0, "found_2+": 0}
    lost, dup = [], []
    for mid, outcome in ledger.outcome.items():
        places = (in_box.get(mid, 0) + ledger.retrieved.get(mid, 0) + in_queue.get(mid, 0)
                  + at_sink.get(mid, 0))
        if outcome == "ok":
            rows["ok"] += 1
            rows["in_mailbox"] += in_box.get(mid, 0) > 0
            rows["retrieved"] += ledger.retrieved.get(mid, 0) > 0
            rows["in_queue"] += in_queue.get(mid, 0) > 0
            rows["at_smarthost"] += at_sink.get(mid, 0) > 0
            if places == 0:
                rows["lost"] += 1
                lost.append(mid)
            elif places > 1:
                where = (f"mailbox {in_box.get(mid, 0)}, retrieved {ledger.retrieved.get(mid, 0)}, "
                         f"queue {in_queue.get(mid, 0)}, smart host {at_sink.get(mid, 0)}")
                if places == at_sink.get(mid, 0) and runner_killed:
                    # a delivery runner (the main process or, since every process delivers
                    # what it queued, a worker) was killed between the smart host's 250 and
                    # writing down the delivery: sent again by the runner that took its claims
                    # back (README "Outbound queue claims", at least once)
                    rows["resent_after_kill"] += 1
                else:
                    rows["duplicated"] += 1
                dup.append(f"{mid}: {where}")
        elif outcome == "unknown":
            unknown["count"] += 1
            key = "found_0" if places == 0 else "found_1" if places == 1 else "found_2+"
            unknown[key] += 1
    never = [mid for mid, o in ledger.outcome.items() if o in ("temp", "perm", "error")
             and (in_box.get(mid, 0) + ledger.retrieved.get(mid, 0) + in_queue.get(mid, 0)
                  + at_sink.get(mid, 0)) > 0]
    leftovers = [str(p.relative_to(state)) for box in BOXES
                 for p in (mailroot / box / "tmp").glob("*")]
    spool = state / "mailroot" / ".spool"
    leftovers += [str(p.relative_to(state)) for p in spool.glob("*")] if spool.exists() else []
    leftovers += [str(p.relative_to(state)) for p in (state / "queue" / "tmp").glob("*")]
    envs = {p.name.removesuffix(".json") for p in (state / "queue" / "env").glob("*.json")}
    leftovers += [f"queue/msg/{p.name} (no envelope)" for p in (state / "queue" / "msg").glob("*")
                  if p.name not in envs]
    # RSS: the longest epoch of the main process
    epochs: dict[int, list[float]] = {}
    for epoch, _t, mb in rss:
        epochs.setdefault(epoch, []).append(mb)
    longest = max(epochs.values(), key=len) if epochs else []
    third = max(1, len(longest) // 3)
    first = statistics.median(longest[:third]) if longest else 0.0
    last = statistics.median(longest[-third:]) if longest else 0.0
    bound = 1.25 * first + 20
    return {
        "messages": rows, "after_dot_disconnects": unknown,
        "refused_but_stored": len(never),
        "refused_but_stored_ids": {
            mid: f"{ledger.rcpt.get(mid)}: {ledger.why.get(mid, '')}; mailbox {in_box.get(mid, 0)}, "
                 f"retrieved {ledger.retrieved.get(mid, 0)}, queue {in_queue.get(mid, 0)}, "
                 f"smart host {at_sink.get(mid, 0)}" for mid in never[:10]},
        "lost_ids": lost[:20], "duplicated_ids": dup[:20],
        "replies_after_dot": ledger.replies,
        "disk_full_replies": ledger.disk_full_replies,
        "pop3_sessions": ledger.pop3_sessions, "pop3_session_errors": ledger.pop3_errors,
        "leftover_files": leftovers[:20],
        "rss_mb": {"samples": len(longest), "first_third_median": round(first, 1),
                   "last_third_median": round(last, 1), "bound": round(bound, 1),
                   "max": round(max(longest), 1) if longest else 0.0},
        "ok": (rows["lost"] == 0 and rows["duplicated"] == 0 and not never and not leftovers
               and last <= bound),
    }


def table(result: dict) -> str:
    m, u, r = result["messages"], result["after_dot_disconnects"], result["rss_mb"]
    lines = [
        "| what | count |", "| --- | --- |",
        f"| tracked messages that got 250 | {m['ok']} |",
        f"| ... in a mailbox at the end | {m['in_mailbox']} |",
        f"| ... retrieved and deleted by POP3 | {m['retrieved']} |",
        f"| ... still in the queue | {m['in_queue']} |",
        f"| ... delivered at the smart host | {m['at_smarthost']} |",
        f"| lost (250, found nowhere) | {m['lost']} |",
        f"| duplicated (250, found twice) | {m['duplicated']} |",
        f"| sent twice to the smart host (queue runner killed with -9 mid-delivery) | "
        f"{m['resent_after_kill']} |",
        f"| after-dot disconnects (found 0 / 1 / 2+ times) | {u['count']} "
        f"({u['found_0']} / {u['found_1']} / {u['found_2+']}) |",
        f"| refused (4xx/5xx) but stored anyway | {result['refused_but_stored']} |",
        f"| 452 4.3.1 replies while the disk was full | {result['disk_full_replies']} |",
        f"| smtp-source messages accepted (background load) | {result.get('smtp_source', 0)} |",
        f"| POP3 sessions committed / broken | {result['pop3_sessions']} / "
        f"{result['pop3_session_errors']} |",
        f"| files left in tmp/ or the spool | {len(result['leftover_files'])} |",
        f"| RSS MB (main + workers): first third, last third, bound, max | "
        f"{r['first_third_median']}, {r['last_third_median']}, {r['bound']}, {r['max']} |",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main

T0 = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    global T0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--fraction", type=float, default=0.7, help="of the measured rate (0.7)")
    p.add_argument("--rate", type=float, default=0.0, help="messages/s instead of measuring")
    p.add_argument("--pop3-clients", type=int, default=8)
    p.add_argument("--senders", type=int, default=8, help="tracked SMTP sender threads")
    p.add_argument("--source-sessions", type=int, default=2, help="smtp-source sessions")
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--window", type=float, default=0.0,
                   help="outage length in seconds (default: 10%% of the run, at most 60)")
    p.add_argument("--state-mb", type=int, default=256)
    p.add_argument("--json", default="")
    p.add_argument("--workdir", default="")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    window = args.window or min(60.0, max(5.0, args.duration * 0.1))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pop3coexist-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    rig = Rig(root, args.state_mb)
    ledger = Ledger()
    result: dict = {}
    try:
        log(f"setting up in {root}")
        rig.setup()
        rate = args.rate
        if not rate:
            measured = measure_rate(rig)
            rate = max(1.0, measured * args.fraction)
            result["measured_rate"] = round(measured, 1)
            log(f"measured {measured:.1f} messages/s; running at {rate:.1f}/s")
        source_rate = float(args.source_sessions)  # smtp-source: one message/s per session
        tracked_rate = max(1.0, rate - source_rate)
        result.update({"rate": round(rate, 1), "duration_s": args.duration, "faults": faults,
                       "window_s": window})
        stop = threading.Event()
        load_stop = threading.Event()
        counter = iter(range(1, 10**9))
        pacer = Pacer(tracked_rate)
        threads = [threading.Thread(target=sender, args=(rig, ledger, pacer, load_stop, counter, i),
                                    daemon=True) for i in range(args.senders)]
        sent = [0]
        threads.append(threading.Thread(target=smtp_source_loop,
                                        args=(rig, load_stop, args.source_sessions, sent),
                                        daemon=True))
        pop3 = [threading.Thread(target=pop3_client, args=(rig, ledger, stop, 100 + i), daemon=True)
                for i in range(args.pop3_clients)]
        rss: list[tuple[int, float, float]] = []

        def sample() -> None:
            while not stop.is_set():
                srv = rig.srv
                if srv is not None and srv.proc is not None:
                    pids = [srv.proc.pid, *[w for w in rig.workers() if w != srv.proc.pid]]
                    rss.append((rig.epoch, time.monotonic() - T0, rss_mb(pids)))
                stop.wait(2)

        sampler = threading.Thread(target=sample, daemon=True)
        T0 = time.monotonic()
        for t in [*threads, *pop3, sampler]:
            t.start()
        injector = Faults(rig, ledger, window)
        schedule = {"worker": 0.10, "loris": 0.20, "smarthost": 0.30, "slapd": 0.50,
                    "disk": 0.65, "main": 0.85}
        for name in sorted(faults, key=lambda f: schedule[f]):
            at = T0 + schedule[name] * args.duration
            if load_stop.wait(max(0.0, at - time.monotonic())):
                break
            injector.run(name, load_stop)
        load_stop.wait(max(0.0, T0 + args.duration - time.monotonic()))
        load_stop.set()
        log("load stopped; draining the queue and the mailboxes")
        for t in threads:
            t.join(60)
        if not rig.smarthost._loop.is_running():
            rig.smarthost.start()
        rig.slapd.ensure_running()
        deadline = time.monotonic() + max(120.0, window * 2)
        while time.monotonic() < deadline:
            queued = scan_files(rig.state / "queue")
            boxes = sum(len(list((rig.state / "mailroot" / HOSTNAME / b / s).glob("*")))
                        for b in BOXES for s in ("new", "cur"))
            if not queued and boxes == 0:
                break
            time.sleep(1)
        stop.set()
        for t in [*pop3, sampler]:
            t.join(60)
        rig.srv.stop()
        result.update(audit(rig, ledger, rss, runner_killed=bool({"main", "worker"} & set(faults))))
        result["smtp_source"] = sent[0]
        result["faults_done"] = injector.done
        print(table(result))
        for f in injector.done:
            print(f"- {f['at']:>7} s  {f['fault']}: {f['note']}")
        print("AUDIT " + ("PASSED" if result["ok"] else "FAILED"))
    finally:
        if rig.srv is not None:
            rig.srv.stop()
        rig.teardown()
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
