"""The length-prefixed wire format between a pool and its template processes, over a socketpair.

frame = b"SBX1" | u32 header length | JSON header | blobs back to back (sizes in header["blob_sizes"]).
JSON and raw bytes only, never pickle: the template runs beside hostile code, so whatever it sends back is
parsed as untrusted data with hard size caps.
"""
from __future__ import annotations

import json
import socket
import struct
import time

MAGIC = b"SBX1"
MAX_HEADER_BYTES = 1 << 20


class ProtocolError(RuntimeError):
    """The other side sent something malformed, too big, or closed mid-frame."""


def encode(header: dict, blobs: list[bytes] = ()) -> list[bytes]:
    header = dict(header, blob_sizes=[len(b) for b in blobs])
    raw = json.dumps(header, separators=(",", ":")).encode()
    return [MAGIC + struct.pack(">I", len(raw)) + raw, *blobs]


def send(sock: socket.socket, header: dict, blobs: list[bytes] = (), deadline: float | None = None) -> None:
    for part in encode(header, list(blobs)):
        if deadline is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(part)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame before the deadline")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("peer closed the connection" + (" mid-frame" if got else ""))
        got += k
    return bytes(buf)


def recv_header(sock: socket.socket, deadline: float | None = None) -> dict:
    """Read one frame's JSON header (its blobs follow on the socket). Raises EOFError, TimeoutError,
    ProtocolError."""
    prefix = _recv_exact(sock, 8, deadline)
    if prefix[:4] != MAGIC:
        raise ProtocolError(f"bad frame magic {prefix[:4]!r}")
    (size,) = struct.unpack(">I", prefix[4:])
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {size} bytes is over the {MAX_HEADER_BYTES} cap")
    try:
        header = json.loads(_recv_exact(sock, size, deadline))
        sizes = header["blob_sizes"]
        if not isinstance(header, dict) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise ValueError("blob_sizes")
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"malformed frame header: {e}") from None
    return header


def recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket (a frame's blobs, read straight into a caller's buffer: no copies)."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete frame before the deadline")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], len(view) - got)
        if k == 0:
            raise EOFError("peer closed the connection mid-frame")
        got += k


def recv(sock: socket.socket, deadline: float | None = None,
         max_blob_bytes: int | None = None) -> tuple[dict, list[bytes]]:
    """Read one frame. Raises EOFError on a clean close, TimeoutError, or ProtocolError."""
    header = recv_header(sock, deadline)
    sizes = header["blob_sizes"]
    if max_blob_bytes is not None and any(s > max_blob_bytes for s in sizes):
        raise ProtocolError(f"frame blob of {max(sizes)} bytes is over the {max_blob_bytes} cap")
    return header, [_recv_exact(sock, s, deadline) if s else b"" for s in sizes]
