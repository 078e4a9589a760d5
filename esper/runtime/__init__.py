"""Shared runtime of every Esper service: host, auth, validation, errors, tracing, clients."""
