"""The operations (ops/), the admin accounts and tokens (identity/adminaccounts.py), and the
admin API resource (adminweb/api.py) without a server: results are data, errors one line,
changes audited; passwords and tokens stored only as scrypt keys and SHA-256; the API refuses
every request without a valid credential (401, no detail) and answers with the operation's
JSON otherwise."""

from __future__ import annotations

import json
import textwrap

import pytest
from twisted.internet import defer
from twisted.web.test.requesthelper import DummyRequest

from pop3coexist.adminweb.api import AdminApi
from pop3coexist.adminweb.graphs import Sample, Sampler, svg_chart
from pop3coexist.config import load_config
from pop3coexist.identity.adminaccounts import AdminAccounts, AdminTokens, verify_password
from pop3coexist.ops.context import Context, OpsError
from pop3coexist.ops.registry import OPERATIONS, check_params, run

DOMAIN = "pop.contoso.test"


@pytest.fixture
def ctx(tmp_path):
    """A Context over a fresh state folder, acting as ``tester`` through the API."""
    path = tmp_path / "pop3coexist.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "{DOMAIN}"
        state_dir = "var"
        [domains]
        local = ["{DOMAIN}"]
        """))
    config = load_config(path)
    config.server.state_dir.mkdir(parents=True)
    return Context(config, actor="tester", via="api")


def test_operations_return_data_and_audit_changes(ctx):
    """A change returns its messages; a listing returns rows; each change (made or refused)
    is one audit line with the actor, never the password."""
    added = run(ctx, "mailbox.add", {"address": f"Ted@{DOMAIN}", "password": "pw-Secret-1"})
    assert added["messages"] == [f"mailbox ted@{DOMAIN} added"]
    run(ctx, "mailbox.lock", {"address": f"ted@{DOMAIN}"})
    run(ctx, "mailbox.quota", {"address": f"ted@{DOMAIN}", "size": "5MB"})
    rows = run(ctx, "mailbox.list", {})["mailboxes"]
    assert {"address": f"ted@{DOMAIN}", "locked": True, "quota": 5_000_000} in rows
    stat = run(ctx, "stat", {"domain": DOMAIN})
    assert stat["total"] == {"messages": 0, "bytes": 0}
    with pytest.raises(OpsError, match=f"^mailbox nobody@{DOMAIN} does not exist$"):
        run(ctx, "mailbox.lock", {"address": f"nobody@{DOMAIN}"})
    audit = (ctx.config.server.state_dir / "admin-audit.log").read_text().splitlines()
    assert any(line.endswith(f"admin=tester via=api action=mailbox.lock target=ted@{DOMAIN} ok")
               for line in audit)
    assert any(f"target=nobody@{DOMAIN} error: mailbox nobody@{DOMAIN} does not exist" in line
               for line in audit)
    assert not any("pw-Secret-1" in line for line in audit)
    assert not any("action=mailbox.list" in line for line in audit)  # reads are not audited


def test_parameters_from_outside_are_checked():
    """Unknown, missing and mistyped parameters are refused by name before anything runs."""
    op = OPERATIONS["mailbox.lock"]
    with pytest.raises(OpsError, match="unknown parameter 'evil'"):
        check_params(op, {"address": "a@b.test", "evil": 1})
    with pytest.raises(OpsError, match="'address' is required"):
        check_params(op, {})
    with pytest.raises(OpsError, match="must be a string"):
        check_params(op, {"address": ["a@b.test"]})
    with pytest.raises(OpsError, match="must be true or false"):
        check_params(OPERATIONS["queue.delete"], {"id": "x", "bounce": "yes"})
    assert check_params(OPERATIONS["queue.delete"], {"id": "x"}) == {"id": "x", "bounce": False}


def test_admin_accounts_are_scrypt_and_tokens_only_hashes(tmp_path):
    """A password is kept as an scrypt key (a salt each) and checks; a wrong one or an unknown
    name does not; a token is shown once and only its SHA-256 is stored; a removed token no
    longer works."""
    accounts = AdminAccounts(tmp_path / "accounts.json")
    accounts.set_password("alice", "Console-Pw-1")
    accounts.set_password("bob", "Console-Pw-1")
    stored = json.loads((tmp_path / "accounts.json").read_text())["accounts"]
    assert stored["alice"]["scrypt"].startswith("16384$8$1$")
    assert stored["alice"]["scrypt"] != stored["bob"]["scrypt"]
    assert "Console-Pw-1" not in (tmp_path / "accounts.json").read_text()
    assert accounts.check("alice", "Console-Pw-1")
    assert not accounts.check("alice", "console-pw-1")
    assert not accounts.check("nobody", "Console-Pw-1")
    assert not verify_password("not$a$hash", "x")
    tokens = AdminTokens(tmp_path / "tokens.json")
    ident, token = tokens.add("alice")
    assert token.startswith(f"p3ca_{ident}_") and token not in (tmp_path / "tokens.json").read_text()
    assert tokens.admin_for(token) == "alice"
    assert tokens.admin_for(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert tokens.admin_for("Bearer " + token) is None
    tokens.remove(ident)
    assert tokens.admin_for(token) is None


def _api(ctx, tmp_path) -> tuple[AdminApi, str]:
    tokens = AdminTokens(tmp_path / "tokens.json")
    _ident, token = tokens.add("ops")

    def make(actor: str, via: str) -> Context:
        ctx.actor, ctx.via = actor, via
        return ctx

    def blocking(f, *args):
        return defer.maybeDeferred(f, *args)

    return AdminApi(make, tokens, {"server": {"hostname": DOMAIN}}, False, blocking), token


def _render(api: AdminApi, method: bytes, path: list[bytes], token: str | None = None,
            body: dict | None = None) -> tuple[int, dict]:
    request = DummyRequest(path)
    request.method = method
    request.uri = request.path = b"/api/v1/" + b"/".join(path)
    if token:
        request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + token.encode())
    if body is not None:
        request.requestHeaders.addRawHeader(b"content-type", b"application/json")
        import io

        request.content = io.BytesIO(json.dumps(body).encode())
    result = api.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request.responseCode or 200, json.loads(b"".join(request.written) or b"{}")


def test_the_api_refuses_without_a_credential_and_runs_with_one(ctx, tmp_path):
    """No token or a wrong one: 401 {"error": "unauthorized"} and nothing runs; with the token
    a read answers its JSON, a change needs POST and JSON, and an operation's refusal is 400
    with its one line."""
    api, token = _api(ctx, tmp_path)
    for credential in (None, "p3ca_00000000_" + "x" * 43):
        assert _render(api, b"POST", [b"domain", b"add"], credential,
                       {"name": "evil.test"}) == (401, {"error": "unauthorized"})
    assert not ctx.store.domain_exists("evil.test")
    code, body = _render(api, b"GET", [b"domain", b"list"], token)
    assert code == 200 and body["domains"][0]["domain"] == DOMAIN
    assert _render(api, b"GET", [b"domain", b"add"], token)[0] == 405
    assert _render(api, b"GET", [b"no", b"such"], token)[0] == 404
    code, body = _render(api, b"POST", [b"domain", b"add"], token, {"name": "new.test"})
    assert (code, body["messages"][0]) == (200, "domain new.test added")
    assert _render(api, b"POST", [b"domain", b"add"], token, {"name": "new.test"}) == \
        (400, {"error": "domain new.test already exists"})


def test_graphs_rates_and_svg():
    """Counter samples become per-minute rates (a counter that restarts counts from zero);
    the SVG is one escaped element with a polyline, no script."""
    sampler = Sampler.__new__(Sampler)
    sampler.metrics = None
    import collections

    sampler.samples = collections.deque([Sample(0, 1, 10, 5, 0), Sample(30, 2, 20, 5, 1),
                                         Sample(60, 0, 3, 0, 0)])
    series = sampler.series()
    assert series["queue"] == [(0, 1.0), (30, 2.0), (60, 0.0)]
    assert series["accepted"] == [(30, 20.0), (60, 0.0)]
    svg = svg_chart(series["queue"], "Queue <length>", "messages")
    assert svg.startswith("<svg") and "<polyline" in svg and "<script" not in svg
    assert "Queue &lt;length&gt;" in svg
    assert "no samples yet" in svg_chart([], "x", "y")
