"""Utilities around the models: image loading, checkpoint locations, dtype names."""
