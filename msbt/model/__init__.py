"""Models: backbones with the paper's heads, the offline EfficientNet-Lite0, augmentation, checkpoints with
lineage, Grad-CAM.
"""
