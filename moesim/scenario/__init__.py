"""Scenario files: the YAML a user writes to describe one what-if question."""
