"""Experiments built on the library: the iso-FLOP sweep (`sweep`) and the demo (`demo`)."""
