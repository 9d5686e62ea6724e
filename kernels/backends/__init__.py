"""Compute backends, each a plugin behind `base.Backend`; `numpy` is always available."""
