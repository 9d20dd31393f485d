"""The telemetry commands of the ``bulkhead`` CLI: ``metrics`` and ``events``.

``bulkhead metrics SANDBOX`` prints a sandbox's Prometheus exposition; ``bulkhead metrics
serve --listen ADDR`` serves every running sandbox's on ``/metrics`` for a Prometheus server.
``bulkhead events SANDBOX [--since N]`` follows the sandbox's events, reconnecting from the
last one it printed when the connection breaks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from .errors import BulkheadError
from .metrics import DEFAULT_LISTEN, SCRAPE_TIMEOUT
from .sandbox import Sandbox


def add_parsers(groups: Any) -> None:
    p = groups.add_parser(
        "metrics",
        help="a sandbox's Prometheus metrics, or `metrics serve` for every sandbox over HTTP",
        description="Print SANDBOX's metrics (Prometheus text format), or with `serve`, "
        "serve every running sandbox's on http://ADDR/metrics, labelled by sandbox.",
    )
    p.add_argument("sandbox", metavar="SANDBOX|serve")
    p.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="ADDR", help=f"serve: default {DEFAULT_LISTEN}"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=SCRAPE_TIMEOUT,
        metavar="S",
        help=f"per sandbox and scrape (default {SCRAPE_TIMEOUT:g})",
    )
    p.set_defaults(func=cmd_metrics)

    p = groups.add_parser(
        "events",
        help="follow a sandbox's events (container exits, OOM kills, ...)",
        description="Print SANDBOX's events as they happen: new ones, or every one after "
        "--since N (the agent keeps the last 4096). Ctrl-C stops.",
    )
    p.add_argument("sandbox")
    p.add_argument("--since", type=int, metavar="N", help="start after event number N (0: all)")
    p.add_argument(
        "--no-follow",
        action="store_true",
        help="print what is there (all kept events without --since) and exit",
    )
    p.add_argument(
        "--accept-gap",
        action="store_true",
        help="events no longer kept are reported as one events_lost event, not an error",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)


def cmd_metrics(args: argparse.Namespace) -> int:
    if args.sandbox != "serve":
        sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
        sys.stdout.write(sandbox.metrics(timeout=args.timeout))
        return 0
    from .metrics import serve

    try:
        server, _thread, collector = serve(args.listen, args.state_dir, timeout=args.timeout)
    except ValueError as exc:
        raise BulkheadError(str(exc)) from None
    host, port = server.server_address[:2]
    print(f"serving every running sandbox's metrics on http://{host}:{port}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    sandbox = Sandbox.get(args.sandbox, state_dir=args.state_dir)
    if not sandbox.alive:
        raise BulkheadError(f"sandbox {args.sandbox!r} is not running")

    def show(event: Any) -> None:
        line = json.dumps(event.to_dict()) if args.json else str(event)
        print(line, flush=True)

    try:
        if args.no_follow:
            # Without --since: all the agent still has (an events_lost line if not from 1).
            since = 0 if args.since is None else args.since
            accept_gap = args.accept_gap or args.since is None
            with sandbox.agent.events(since, accept_gap=accept_gap) as stream:
                end = stream.newest_at_start
                if since == end:
                    return 0  # (a since past the end is the agent's OUT_OF_RANGE, below)
                for event in stream:
                    show(event)
                    if event.seq >= end:
                        break
            return 0
        for event in sandbox.events(args.since, accept_gap=args.accept_gap):
            show(event)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `| head`
        pass
    return 0
