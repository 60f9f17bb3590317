"""Benchmarks: each prints the ratios and minutes it measured in one run and writes them
under ``benchmarks/results/`` (``fedpersona bench`` runs the suite). They sit on top of
everything else: they may import ``simulations``, ``server``, ``client`` and ``common``."""
