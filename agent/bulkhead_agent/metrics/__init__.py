"""Metrics: RPC tallies kept from the start (``rpc``), /proc readers (``procfs``) and the
Prometheus collectors built on the first scrape (``collectors``). Served by
``services.telemetry``."""
