"""Models: backbones with the paper's heads, the offline EfficientNet-Lite0/1/2, augmentation, checkpoints with
lineage, Grad-CAM.
"""
