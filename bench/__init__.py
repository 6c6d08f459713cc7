"""Dispatch's benchmark: `make bench` runs it, `python -m bench --help` explains it."""
