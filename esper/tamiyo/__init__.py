"""Tamiyo: the strategic controller (heuristic, baselines, learned GNN policy) and its service."""
