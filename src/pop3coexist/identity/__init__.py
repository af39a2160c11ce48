"""Identity: credential checkers for each auth.method (password file, directory, local accounts)."""
