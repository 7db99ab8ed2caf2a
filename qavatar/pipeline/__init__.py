"""Inference front and back: audio features, text and image encoders, sampling, video out."""
