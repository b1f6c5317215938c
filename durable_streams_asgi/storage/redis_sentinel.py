"""Redis behind Sentinel: ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``.

The client asks the sentinels for the service's master and follows it through a failover: a
command that finds the old master gone (or turned replica) fails, and the next connection asks
the sentinels again. Everything else is plain Redis; see the README for what a failover can lose
(replication is asynchronous).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

SCHEMES = ("redis+sentinel", "rediss+sentinel")


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES


def sentinel_client(url: str, options: dict[str, Any]) -> Redis:
    """A client of the service's master, found through the sentinels of ``url``."""
    parts = urlsplit(url)
    hosts: list[tuple[str, int]] = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        if not host or not port.isdigit():
            raise ValueError(f"a sentinel is host:port, not {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends with /service or /service/db")
    connection: dict[str, Any] = {k: v for k, v in options.items() if k != "timeout"}  # not a blocking pool
    if parts.username:
        connection["username"] = unquote(parts.username)
    if parts.password:
        connection["password"] = unquote(parts.password)
    if len(path) == 2:
        connection["db"] = int(path[1])
    if parts.scheme == "rediss+sentinel":
        connection["ssl"] = True
    timeouts = {k: options[k] for k in ("socket_connect_timeout", "socket_timeout") if k in options}
    sentinel_kwargs = {**timeouts, **({"ssl": True} if connection.get("ssl") else {})}
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **timeouts)
    return sentinel.master_for(path[0], redis_class=Redis, **connection)
