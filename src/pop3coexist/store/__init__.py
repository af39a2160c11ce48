"""Storage: Maildir mailboxes (maildir.py) and the outbound queue (queue.py). File formats live here only."""
