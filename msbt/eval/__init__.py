"""Evaluation: metrics with intervals, scoring a checkpoint on the test split, the HTML report.
"""
