"""``python -m bulkhead_init`` and the ``bulkhead-init`` console script."""

from bulkhead_init.main import main

if __name__ == "__main__":
    main()
