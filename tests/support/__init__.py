"""Shared test helpers: dialogue runner, test certificates, outside programs, free ports."""
