"""Dispatch's benchmark (issue 6): `make bench` runs it, `python -m bench --help` explains it."""
