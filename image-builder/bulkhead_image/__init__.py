"""Bulkhead guest image builder."""
