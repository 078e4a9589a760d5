"""Esper: morphogenetic training platform."""
