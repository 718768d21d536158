"""Keras 3 integration: widen live models, grow them while they train."""
