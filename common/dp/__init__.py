"""Differential privacy: update clipping, Gaussian noise and accountants (Opacus-backed)."""
