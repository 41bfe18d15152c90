"""Schedules: stored task templates that any worker fires once per slot (`schemas/schedules.py`).

`clock` says which slots are due, `firing` decides and publishes them (one decision per slot, stored
in the registry, and a bus-level dedupe id), `desk` answers the requests on `forseti.schedules`.
"""
