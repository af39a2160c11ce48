"""Mail authentication over DNS: the [dns] resolvers and the SPF, DKIM and DMARC checks."""
