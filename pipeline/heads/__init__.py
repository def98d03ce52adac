"""Heads: your own labels, as linear classifiers on the stored embeddings (head.py: the format,
loading and applying one)."""
