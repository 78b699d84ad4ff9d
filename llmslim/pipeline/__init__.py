"""Compression as a recipe of stages: ``compress(model, recipe)`` and ``compress_to_folder``."""
