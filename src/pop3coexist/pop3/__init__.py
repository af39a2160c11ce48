"""The POP3 front-end over twisted.mail.pop3 (RFC 1939, 2449, 2595, 5034)."""
