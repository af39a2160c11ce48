"""The ManageSieve front-end (RFC 5804): see ``server``."""
