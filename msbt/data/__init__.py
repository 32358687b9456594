"""Data: discovery (scan and validate), leakage-safe splits, the built-in synthetic set, Ray Data
preprocessing, and the Parquet store format (`store`).
"""
