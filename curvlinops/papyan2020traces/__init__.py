"""Spectral density estimation following Papyan (2020)."""
