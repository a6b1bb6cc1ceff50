"""Benchmarks (`python -m bench.<name>`): the numbers README.md cites, with the machine that measured them."""
