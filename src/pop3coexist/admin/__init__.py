"""The pop3coexist-admin command."""
