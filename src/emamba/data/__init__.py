"""Datasets and loaders. ``time_series``: Time-Series-Library-protocol forecasting data (ETT, custom CSV)."""
