"""The IMAP4rev1 front-end (RFC 3501; issue 18): ``factory.IMAPServerFactory`` builds
``server.IMAPServer`` sessions over the store's folders (``interfaces.IFolderStore``)."""
