"""Urza: see docs/ARCHITECTURE.md."""
