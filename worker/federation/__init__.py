"""Federated learning: the coordinator service, its strategies and privacy options, and the agents' side."""
