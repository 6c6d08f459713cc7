"""The agent side: the typed client, the worker SDK and the client commands; imports only
dispatch.models, dispatch.errors and dispatch.wire of the rest, never the server."""
