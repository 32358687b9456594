"""Pure image code: reading and validating files, cell patches, near-duplicate grouping, contact sheets.

No Ray, no TensorFlow: numpy, OpenCV and scikit-image only, tested with small arrays in milliseconds.
"""
