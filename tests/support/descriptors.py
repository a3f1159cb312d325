"""This process's open descriptors, sorted by what holds them (Linux: reads /proc/self/fd).

Why: a flood test must tell a leaked accepted socket from the coordinator's own PostgreSQL
connections, which it opens lazily and keeps (history, catalog, lock session): their number
depends on which bookkeeping ran so far, not on how many clients came and went.
"""

from __future__ import annotations

import os
import socket
from collections import Counter

import psycopg.conninfo

ACCEPTED = "accepted"
POSTGRES = "postgres"
OTHER = "other"


def descriptor_kinds(listening_port: int, dsn: str) -> Counter[str]:
    """Open descriptors by kind: sockets accepted on `listening_port`, connections to the
    PostgreSQL server of `dsn`, and everything else (the listener itself among them)."""
    pg_port = int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile, or the directory's own descriptor
        is_socket = target.startswith("socket:")
        kinds[_kind(int(name), listening_port, pg_port) if is_socket else OTHER] += 1
    return kinds


def _kind(fd: int, listening_port: int, pg_port: int) -> str:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return OTHER
    try:
        local, peer = sock.getsockname(), _peer(sock)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.close()
    if isinstance(peer, str):
        return POSTGRES if f".s.PGSQL.{pg_port}" in peer else OTHER
    if isinstance(local, tuple) and local[1] == listening_port and not listening:
        return ACCEPTED  # connected, or reset by its peer and not closed yet
    if isinstance(peer, tuple) and peer[1] == pg_port:
        return POSTGRES
    return OTHER


def _peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None  # not connected: a listener, or reset by its peer
