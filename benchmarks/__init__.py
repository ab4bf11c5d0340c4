"""Benchmarks: each script writes JSON under benchmarks/results/ and prints a short table."""
