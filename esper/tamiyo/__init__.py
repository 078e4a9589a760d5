"""Tamiyo: see docs/ARCHITECTURE.md."""
