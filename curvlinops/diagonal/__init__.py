"""Randomised diagonal estimators."""
