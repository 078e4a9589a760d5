"""Karn: see docs/ARCHITECTURE.md."""
