"""The dashboard at /ui: server-rendered pages, live over server-sent events (see hub.py)."""
