"""asv benchmarks of fastweights, read against the machine's own limits (see ``limits.py``)."""
