"""Patch shards: build them from image sources, stream them to training, fetch them by index."""
