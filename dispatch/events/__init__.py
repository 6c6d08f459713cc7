"""NATS via Hermes: the connection (connection.py), the inbound subscriptions that create tasks and
take agent reports (inbound.py), the outbox relay that publishes the event log (relay.py), and the
wire schemas of both directions (schemas.py)."""
