"""Bulkhead guest agent."""
