"""Latency, size and accuracy measurement on inference runtimes."""
