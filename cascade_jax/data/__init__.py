"""Data: image preprocessing, datasets, aspect-ratio buckets."""
