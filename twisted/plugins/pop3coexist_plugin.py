"""twistd plugin: ``twistd pop3coexist`` (the service maker lives in pop3coexist.tap)."""

from twisted.application.service import ServiceMaker

pop3coexist = ServiceMaker(
    "pop3coexist",
    "pop3coexist.tap",
    "POP3 + ESMTP mail server that coexists with an organisation gateway",
    "pop3coexist",
)
