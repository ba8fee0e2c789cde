"""Layers shared by more than one method (a layer moves here when a second method needs it)."""
