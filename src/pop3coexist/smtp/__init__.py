"""The ESMTP front-end over twisted.mail.smtp, and the outbound SMTP client."""
