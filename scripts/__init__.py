"""Custom components of the self-cleansing segmentation bundle."""
