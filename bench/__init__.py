"""Benchmarks: each module is one `gda bench NAME`, writing JSON for machines and a table for people."""
