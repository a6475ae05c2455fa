"""Dagster wiring for gda: assets, partitions, checks, sensors, jobs and the ``Definitions`` factory.

Asset bodies are thin glue over ``gda`` functions, so the data flow reads from this package alone.
"""
