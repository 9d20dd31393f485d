"""Bulkhead host client: drive a sandbox VM and its guest agent."""
