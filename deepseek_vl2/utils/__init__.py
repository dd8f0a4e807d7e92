"""Utilities around the models: image loading."""
