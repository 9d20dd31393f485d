"""Entry point of the ``bulkhead-agent`` console script and ``python -m bulkhead_agent``."""

from __future__ import annotations


def main() -> None:
    from bulkhead_agent.main import main as run

    run()


if __name__ == "__main__":
    main()
