"""Datasets, text processing and the grain input pipeline.

Modules here that need TensorFlow Datasets import it themselves, so that the
model, train step and decoder import without it.
"""
