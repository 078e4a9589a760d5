"""Tolaria: see docs/ARCHITECTURE.md."""
