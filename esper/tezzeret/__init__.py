"""Tezzeret: see docs/ARCHITECTURE.md."""
