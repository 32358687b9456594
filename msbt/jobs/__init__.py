"""Jobs: the main pipeline and its steps, and the experiments (cross-validation, ablation, comparison).
"""
