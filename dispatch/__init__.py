"""Dispatch: the task broker and work scheduler for agent swarms; the database is the scheduler."""

__version__ = "0.1.0"
