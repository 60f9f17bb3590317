"""Differential privacy: the privatize step (clip → noise → quantize, :mod:`.privatize`), its
clipping and noise, and the accountants (Opacus-backed, :mod:`.accounting`)."""
