"""Log-in abuse (issue 16 item 4): a bounded, distributed password-guessing run against POP3
and SMTP AUTH of the real server, from many source addresses on loopback (each client socket
bound to its own 127.1.x.y before it connects), while the real user logs in from another
address (127.0.0.2).

What must hold: the real user always gets in (policy/throttle.py LoginGate: a source whose
last log-in succeeded is checked at once, never queued behind unknown sources; how fast is
measured in bench/, here a hung log-in fails by its 30 s socket timeout); the guessing rate
from every
source address stays within what ``auth_failure_delay`` / ``auth_failure_delay_max`` allow
(policy/throttle.py: one guess, then a wait of base, 2 x base, ... up to the maximum, however
many connections the source opens at once); and no account is locked out by strangers (the
attacked account's own owner gets in, and the account is not locked afterwards).
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.support.server import HOSTNAME, ServerProcess, require_installed_plugin

pytestmark = pytest.mark.integration

TED = f"ted@{HOSTNAME}"
PASSWORD = "Abuse-run real pw 4"
BASE, MAXIMUM = 0.5, 4.0  # the configured per-source delays of this run
SOURCES = 24  # attacking addresses: 127.1.0.1 .. 127.1.0.24
PARALLEL = 4  # connections each attacking address keeps going at once
DURATION = 12.0  # seconds of attack
LAST_ANSWER = 60.0  # seconds after the attack a source still waits for its first answer
REAL_USER = "127.0.0.2"


def allowed_guesses(duration: float, base: float = BASE, maximum: float = MAXIMUM) -> int:
    """How many refused guesses one source may get answered in ``duration`` seconds: the
    first at once, then one per delay (base, doubling, capped at ``maximum``), plus one for a
    guess answered at the edge of the window."""
    t, n, delay = 0.0, 1, base
    while t + delay <= duration:
        t += delay
        n += 1
        delay = min(maximum, delay * 2)
    return n + 1


@dataclass
class Tally:
    refused: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, source: str) -> None:
        with self.lock:
            self.refused[source] = self.refused.get(source, 0) + 1


def going(source: str, stop: float, tally: Tally) -> bool:
    """Whether an attacking connection of ``source`` sends another guess: until ``stop``
    (monotonic), and after it only while ``source`` has had no guess answered (at most
    LAST_ANSWER seconds more), so that every source gets an answer however slow the machine."""
    now = time.monotonic()
    if now < stop:
        return True
    with tally.lock:
        answered = tally.refused.get(source, 0)
    return not answered and now < stop + LAST_ANSWER


def connect(source: str, port: int, timeout: float = 30.0) -> tuple[socket.socket, object]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock, sock.makefile("rb")


def pop3_guess_loop(source: str, port: int, stop: float, tally: Tally) -> None:
    """One attacking connection: USER/PASS guesses until ``stop`` (monotonic)."""
    n = 0
    while going(source, stop, tally):
        try:
            sock, f = connect(source, port)
            with sock, f:
                f.readline()
                while going(source, stop, tally):
                    n += 1
                    sock.sendall(f"USER {TED}\r\nPASS guess-{source}-{n}\r\n".encode())
                    f.readline()
                    reply = f.readline()
                    if not reply:
                        break
                    if reply.startswith(b"-ERR"):
                        tally.add(source)
                    else:
                        tally.errors.append(f"{source}: unexpected {reply!r}")
                        return
        except TimeoutError:
            # a guess held past the socket timeout (the gate's queue on a loaded machine):
            # held, not answered; a source with no answer yet tries again while ``going``
            continue
        except OSError as e:
            if time.monotonic() < stop:
                tally.errors.append(f"{source}: {e}")
            return


def smtp_guess_loop(source: str, port: int, stop: float, tally: Tally) -> None:
    """One attacking connection: AUTH PLAIN guesses until ``stop``."""
    n = 0
    while going(source, stop, tally):
        try:
            sock, f = connect(source, port)
            with sock, f:
                f.readline()
                sock.sendall(b"EHLO guesser.example.test\r\n")
                while True:
                    line = f.readline()
                    if not line or line[3:4] == b" ":
                        break
                while going(source, stop, tally):
                    n += 1
                    token = base64.b64encode(f"\0{TED}\0guess-{source}-{n}".encode()).decode()
                    sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
                    reply = f.readline()
                    if not reply:
                        break
                    if reply.startswith(b"535"):
                        tally.add(source)
                    elif reply.startswith(b"421"):
                        break
                    else:
                        tally.errors.append(f"{source}: unexpected {reply!r}")
                        return
        except TimeoutError:
            # a guess held past the socket timeout (the gate's queue on a loaded machine):
            # held, not answered; a source with no answer yet tries again while ``going``
            continue
        except OSError as e:
            if time.monotonic() < stop:
                tally.errors.append(f"{source}: {e}")
            return


def real_pop3_login(port: int) -> float:
    """A good USER/PASS log-in from REAL_USER that must succeed (a hung one fails by the
    socket timeout); returns the seconds it took, for the printed summary only."""
    start = time.monotonic()
    sock, f = connect(REAL_USER, port)
    with sock, f:
        f.readline()
        sock.sendall(f"USER {TED}\r\nPASS {PASSWORD}\r\n".encode())
        f.readline()
        reply = f.readline()
        took = time.monotonic() - start
        sock.sendall(b"QUIT\r\n")
    assert reply.startswith(b"+OK"), reply
    return took


def real_smtp_login(port: int) -> float:
    """A good AUTH PLAIN from REAL_USER that must succeed, as ``real_pop3_login``."""
    start = time.monotonic()
    sock, f = connect(REAL_USER, port)
    with sock, f:
        f.readline()
        sock.sendall(b"EHLO real.example.test\r\n")
        while f.readline()[3:4] != b" ":
            pass
        token = base64.b64encode(f"\0{TED}\0{PASSWORD}".encode()).decode()
        sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
        reply = f.readline()
        took = time.monotonic() - start
        sock.sendall(b"QUIT\r\n")
    assert reply.startswith(b"235"), reply
    return took


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server, two processes (the shared throttle table), delays of 0.5 s to 4 s,
    the real scrypt cost for passwords."""
    require_installed_plugin()
    srv = ServerProcess(
        tmp_path_factory.mktemp("abuse"), tls=False, server_config="workers = 2",
        pop3_config=f'auth_failure_delay_max = "{MAXIMUM}s"',
        smtp_config=f'auth_failure_delay_max = "{MAXIMUM}s"',
    )
    srv.write_config()
    text = srv.config_path.read_text().replace('auth_failure_delay = "0.05s"',
                                               f'auth_failure_delay = "{BASE}s"')
    srv.config_path.write_text(text)
    srv.add_mailbox(TED, PASSWORD)
    srv.start()
    yield srv
    srv.stop_cleanly(PASSWORD)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
def test_distributed_guessing_is_bounded_and_the_real_user_gets_in(server, protocol):
    """24 source addresses x 4 parallel connections guess the password for 12 s (a source
    with no answer yet goes on until it has one); meanwhile the real user logs in from
    127.0.0.2 every 0.5 s. Every real log-in succeeds (each bounded by a 30 s socket timeout,
    not timed: speed is for bench/); every source got at least one guess answered, and none
    more than its delay schedule allows (parallel connections do not multiply it); the
    account is not locked afterwards (the owner gets in again)."""
    port = server.port("pop3") if protocol == "pop3" else server.port("submission")
    loop = pop3_guess_loop if protocol == "pop3" else smtp_guess_loop
    real = real_pop3_login if protocol == "pop3" else real_smtp_login
    real(port)  # the user's mail client polled before the attack began
    tally = Tally()
    stop = time.monotonic() + DURATION
    sources = [f"127.1.0.{i}" for i in range(1, SOURCES + 1)]
    threads = [threading.Thread(target=loop, args=(s, port, stop, tally), daemon=True)
               for s in sources for _ in range(PARALLEL)]
    for t in threads:
        t.start()
    times = []
    while time.monotonic() < stop:
        times.append(real(port))
        time.sleep(0.5)  # the real user's polling interval, not a wait for a result
    for t in threads:
        t.join(timeout=LAST_ANSWER + 30)
    assert not tally.errors, tally.errors[:5]
    bound = allowed_guesses(DURATION)
    total = sum(tally.refused.values())
    worst = max(tally.refused.values())
    print(f"\n{protocol}: {total} refused guesses from {len(tally.refused)} sources in "
          f"{DURATION:.0f} s (bound {bound} per source, worst {worst}); real user: "
          f"{len(times)} log-ins, slowest {max(times):.3f} s")
    assert sorted(tally.refused) == sorted(sources), tally.refused  # every source answered
    assert worst <= bound + PARALLEL - 1, tally.refused  # the first guesses of parallel connections
    assert times  # every one of them succeeded (real() asserts it)
    # no lock-out by strangers: the owner still gets in afterwards
    real(port)
