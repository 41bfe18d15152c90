"""One worker's machinery, from a delivery to its outcome: read `runtime.py`, then `jobs.py`."""
