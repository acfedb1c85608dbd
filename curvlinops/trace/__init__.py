"""Randomised trace estimators."""
