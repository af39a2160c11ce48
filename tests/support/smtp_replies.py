"""Expected ESMTP replies of the unit-tier server (tests/support/smtp_fakes.py: host
pop.contoso.test, client 203.0.113.5, TLS offered, password-file SASL), written out here once
as test-side constants (aiosmtpd's testing/statuscodes.py habit), never taken from the code
under test."""

GREETING = b"220 pop.contoso.test ESMTP pop3coexist\r\n"
EHLO_CLEAR = (
    b"250-pop.contoso.test Hello [203.0.113.5]\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10000000\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-DSN\r\n"
    b"250-STARTTLS\r\n"
    b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n"
)
EHLO_TLS = EHLO_CLEAR.replace(b"250-STARTTLS\r\n", b"")
