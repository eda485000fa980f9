"""Client input made safe for one log line."""

from __future__ import annotations

# Printable ASCII stays as it is; everything else (CR, LF, ESC, bytes >= 0x80)
# becomes a visible escape, so a client cannot start a new log line or drive
# the operator's terminal.
_ESCAPES = {i: f"\\x{i:02x}" for i in range(256)}
_ESCAPES.update({i: chr(i) for i in range(0x20, 0x7F)})
_ESCAPES.update({0x5C: "\\\\", 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def loggable(data: bytes | str, limit: int = 200) -> str:
    """Escape ``data`` for a log line, cut to ``limit`` bytes with a marker."""
    raw = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else data
    shown = "".join(_ESCAPES[b] for b in raw[:limit])
    return shown + (f"...(+{len(raw) - limit} bytes)" if len(raw) > limit else "")
