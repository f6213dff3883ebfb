#!/usr/bin/env python3
"""Container healthchecks (exit 0 healthy, 1 unhealthy), used by the images' HEALTHCHECK and compose.

    healthcheck.py http URL        the URL answers 2xx (or --accept CODE) within the timeout
    healthcheck.py rq-worker       an RQ worker of this container (same hostname) is registered in
                                   Redis ($REDIS_URL) with a heartbeat younger than --max-age seconds
    healthcheck.py rq-cron         the same for an RQ CronScheduler (the one cron process)

Standard library only for `http`; `redis` and `rq` (in every samlight image) for the RQ checks.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone


def check_http(url: str, timeout: float, accept: frozenset[int] = frozenset(),
               auth: tuple[str, str] | None = None) -> str | None:
    """None when `url` answers 2xx (or a status in `accept`) within `timeout`, else the reason."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (fixed local URL)
            if 200 <= response.status < 300 or response.status in accept:
                return None
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as error:
        if error.code in accept:
            return None
        return f"{url} answered {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def check_rq(kind: str, redis_url: str, hostname: str, max_age: float, timeout: float) -> str | None:
    """None when an RQ worker (kind "worker") or RQ CronScheduler (kind "cron") started on `hostname`
    sent a heartbeat in the last `max_age` seconds.

    Uses RQ's own registries, so it works for every worker class without importing samlight's code.
    """
    # imported here: the http check must work in images without redis/rq
    import redis
    from rq import Worker
    from rq.cron import CronScheduler

    connection = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        if kind == "worker":
            found = [(w.name, w.hostname, w.last_heartbeat) for w in Worker.all(connection=connection)]
        else:
            found = [(s.name, s.hostname, s.last_heartbeat) for s in CronScheduler.all(connection, cleanup=False)]
    except redis.RedisError as error:
        return f"redis: {error}"
    finally:
        connection.close()
    stale = []
    for name, host, beat in found:
        if host != hostname:
            continue
        if beat is not None and time.time() - _timestamp(beat) <= max_age:
            return None
        stale.append(f"{name} last heartbeat {beat or 'never'}")
    if stale:
        return "stale: " + "; ".join(stale)
    return f"no RQ {kind} registered from host {hostname!r}"


def _timestamp(moment: datetime) -> float:
    # RQ stores naive UTC datetimes for workers and aware ones for cron schedulers
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _auth_from_env(spec: str | None) -> tuple[str, str] | None:
    if not spec:
        return None
    user_var, _, pass_var = spec.partition(":")
    user = os.environ.get(user_var)
    return (user, os.environ.get(pass_var, "")) if user else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for each network call")
    sub = parser.add_subparsers(dest="check", required=True)
    http = sub.add_parser("http", help="GET a URL")
    http.add_argument("url")
    http.add_argument("--accept", type=int, action="append", default=[],
                      help="another status that means up (e.g. 401 behind basic auth)")
    http.add_argument("--auth-env", metavar="USER_VAR:PASS_VAR",
                      help="send basic auth with the credentials in these variables, when USER_VAR is set")
    for kind in ("worker", "cron"):
        what = "an RQ worker" if kind == "worker" else "an RQ CronScheduler"
        rq = sub.add_parser(f"rq-{kind}", help=f"{what} started on this host sends heartbeats")
        rq.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
        rq.add_argument("--hostname", default=socket.gethostname())
        # an idle RQ worker beats every worker_ttl - 15 s (405 s by default) and its key lives
        # worker_ttl + 60 s; a CronScheduler beats at least once a minute
        rq.add_argument("--max-age", type=float, default=480.0 if kind == "worker" else 180.0,
                        help="seconds since the last heartbeat")
    args = parser.parse_args(argv)

    if args.check == "http":
        problem = check_http(args.url, args.timeout, frozenset(args.accept), _auth_from_env(args.auth_env))
    elif not args.redis_url:
        problem = "REDIS_URL is not set"
    else:
        problem = check_rq(args.check.removeprefix("rq-"), args.redis_url, args.hostname, args.max_age, args.timeout)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
