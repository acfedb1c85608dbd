"""Randomised norm estimators."""
