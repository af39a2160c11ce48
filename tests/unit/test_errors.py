"""The one error vocabulary (errors.py): every failure that reaches a client carries its SMTP
code, enhanced code and POP3 response code, and keeps its detail out of the reply."""

from __future__ import annotations

import pytest
from twisted.cred.error import LoginDenied, UnauthorizedLogin, UnhandledCredentials

from pop3coexist import errors

CASES = [
    # (failure, SMTP reply, text after POP3 "-ERR ")
    (errors.LoginRefused("locked"), "535 5.7.8 Authentication credentials invalid",
     "[AUTH] mailbox is locked"),
    (errors.BadCredentials(), "535 5.7.8 Authentication credentials invalid",
     "[AUTH] authentication failed"),
    (errors.MailboxInUse("busy"), "450 4.2.0 Mailbox in use, try again later",
     "[IN-USE] mailbox is in use by another session"),
    (errors.AuthUnavailable("ldap down"), "454 4.7.0 Temporary authentication failure",
     "[SYS/TEMP] authentication service unavailable, try again later"),
    (errors.DirectoryUnavailable(), "451 4.4.3 Directory lookup failed, try again later",
     "[SYS/TEMP] directory lookup failed, try again later"),
    (errors.QuotaExceeded("mailbox a@b is over its quota"), "552 5.2.2 Mailbox full",
     "mailbox full"),
]


@pytest.mark.parametrize(("error", "smtp", "pop3"), CASES)
def test_each_failure_carries_its_replies(error, smtp, pop3):
    """Each MailError kind answers SMTP and POP3 clients with fixed replies, whatever detail
    it was raised with, and as_mail_error hands it through unchanged."""
    assert error.reply() == smtp
    assert error.pop3_reply() == pop3
    assert errors.as_mail_error(error) is error


def test_detail_stays_in_str_for_logs_and_admin():
    """str() of a store or directory failure is the detail it was raised with (the admin
    command and the logs print it); the client reply never holds it."""
    e = errors.StoreError("cannot read /var/mail/x: Permission denied")
    assert str(e) == "cannot read /var/mail/x: Permission denied"
    assert "/var/mail" not in e.reply() and "/var/mail" not in e.pop3_reply()
    assert str(errors.LoginRefused()) == ""


@pytest.mark.parametrize("exc", [errors.StoreError("io"), errors.NoSuchMailbox("gone"),
                                 OSError("disk"), RuntimeError("bug")])
def test_internal_failures_get_the_front_ends_own_reply(exc):
    """A failure that says nothing a client may see (store error, I/O error, bug) maps to
    None: the front-end answers with its local-error reply for the command."""
    assert errors.as_mail_error(exc) is None


@pytest.mark.parametrize("exc", [UnauthorizedLogin(), UnhandledCredentials(), LoginDenied()])
def test_twisted_login_failures_are_bad_credentials(exc):
    """A twisted.cred LoginFailed is BadCredentials: 535 5.7.8 and -ERR [AUTH]."""
    error = errors.as_mail_error(exc)
    assert isinstance(error, errors.BadCredentials)
    assert error.reply() == "535 5.7.8 Authentication credentials invalid"
    assert error.pop3_reply() == "[AUTH] authentication failed"


def test_plain_mail_errors_have_no_pop3_code():
    """A policy refusal built from code, enhanced code and text has no POP3 response code."""
    e = errors.PermanentFailure("<x@y>: no such user here", "5.1.1", 550)
    assert e.reply() == "550 5.1.1 <x@y>: no such user here"
    assert e.pop3 is None and not e.temporary
