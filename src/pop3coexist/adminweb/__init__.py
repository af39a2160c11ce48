"""The admin API and console (README "Admin console")."""
