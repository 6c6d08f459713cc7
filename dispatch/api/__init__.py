"""The HTTP surface: the API app (port 8600) and the ops app (port 8601)."""
