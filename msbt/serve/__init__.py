"""Using a trained model: prediction on new files and export.
"""
