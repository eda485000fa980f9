"""Validators shared by the command line and the TOML file.

Each takes the raw value (a ``str`` from the command line, or a TOML value) and
returns the checked value or raises ``ValueError`` with a reason a person can act
on. The caller adds which option or key it was.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]

_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")


def _whole(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    raise ValueError(f"expected a whole number, got {value!r}")


def count(value: Any) -> int:
    """A whole number >= 0 (0 usually means 'no limit')."""
    return _whole(value)


def positive(value: Any) -> int:
    number = _whole(value)
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


MAX_WORKERS = 64


def workers(value: Any) -> int:
    """How many processes serve: 1 to :data:`MAX_WORKERS` (a typo must not fork hundreds)."""
    number = positive(value)
    if number > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, got {number}")
    return number


def seconds(value: Any) -> float:
    """A duration in seconds >= 0 (0 usually means 'never')."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"must be a finite number >= 0, got {value!r}")
    return number


def flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def optional_path(value: Any) -> str:
    """A file or folder name; empty means 'not set'."""
    return text(value).strip()


def optional_folder(value: Any) -> str:
    """An existing folder; empty means 'not set'."""
    path = optional_path(value)
    if path and not os.path.isdir(path):
        raise ValueError(f"no such folder: {path!r}")
    return path


def interface(value: Any) -> str:
    address = text(value).strip()
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got {value!r}") from None
    return address


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str:
        choice = text(value).strip().lower()
        if choice not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return choice

    return check


def strings(value: Any) -> tuple[str, ...]:
    """A list of strings (TOML array), or one string (a repeatable option)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def auth_descriptions(value: Any) -> tuple[str, ...]:
    """strcred descriptions (``memory:alice:secret``, ``file:users.txt``),
    checked the way ``--auth`` checks them, so a TOML file gets the same."""
    from twisted.cred.strcred import InvalidAuthType, makeChecker

    descriptions = strings(value)
    for description in descriptions:
        kind, _, argument = description.partition(":")
        if kind == "file" and not os.path.isfile(argument):
            # strcred would only print a warning and then refuse everyone.
            raise ValueError(f"file:{argument}: no such users file")
        try:
            makeChecker(description)
        except InvalidAuthType:
            raise ValueError(f"unknown checker {kind!r} (twistd sockproto --help-auth lists them)") from None
        except Exception as error:  # strcred raises several kinds; all mean 'bad'
            raise ValueError(f"bad checker {kind!r}: {error}") from None
    return descriptions


def port_number(value: Any) -> int:
    number = _whole(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range 0-65535: {number}")
    return number


def _off_or_number(value: Any) -> tuple[str, bool]:
    """``(normal form, True)`` for ``off`` or a port number, else ``(spec, False)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(port_number(value)), True
    spec = text(value).strip()
    if spec.lower() == "off":
        return "off", True
    if spec.isdigit():
        return str(port_number(spec)), True
    return spec, False


def stream_port(value: Any) -> str:
    """``off``, a port number, or a Twisted server endpoint description."""
    spec, simple = _off_or_number(value)
    if simple:
        return spec
    kind = spec.split(":", 1)[0]
    if kind not in _ENDPOINT_TYPES:
        raise ValueError(
            f"expected a port number, 'off' or an endpoint such as "
            f"tcp:9000:interface=127.0.0.1; got {value!r}"
        )
    _parse_endpoint(spec)
    return spec


def _split(text: str, separator: str, limit: int = 0) -> list[str]:
    """Split at ``separator`` where no backslash escapes it (Twisted's grammar)."""
    return re.split(rf"(?<!\\){separator}", text, maxsplit=limit)


# The arguments Twisted's server endpoint grammars take by position, in order.
_POSITIONAL = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
    "unix": ("address", "mode", "backlog"),
}


def endpoint_argument(description: str, name: str) -> str | None:
    """What a server endpoint description gives argument ``name``, as
    ``name=value`` or by position (``tcp:9000:0.0.0.0`` names its interface),
    unescaped; None if it gives nothing."""
    kind, _, rest = description.partition(":")
    positional = []
    for item in _split(rest, ":"):
        key_value = _split(item, "=", 1)
        if len(key_value) == 2 and key_value[0] == name:
            return key_value[1].replace("\\:", ":")
        if len(key_value) == 1:
            positional.append(item)
    names = _POSITIONAL.get(kind, ())
    if name in names and names.index(name) < len(positional):
        return positional[names.index(name)].replace("\\:", ":")
    return None


def lacks_tls_files(spec: str) -> bool:
    """An ``ssl:`` description naming no key or certificate (by keyword or
    by position): the suite's ``--tls-cert``/``--tls-key`` fill it in
    (endpoints.stream_description)."""
    return spec.startswith("ssl:") and all(
        endpoint_argument(spec, name) is None for name in ("privateKey", "certKey")
    )


def _parse_endpoint(spec: str) -> None:
    # Parsing builds the endpoint object (and loads TLS files for ssl:) without
    # listening, so a bad description is caught before anything starts.
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, spec)
    except OSError as error:  # a file the endpoint names (ssl: key and certificate)
        # One that names none is fine: --tls-cert/--tls-key fill it in
        # (listening.stream_listener); its port is checked all the same.
        if not lacks_tls_files(spec):
            where = f" {error.filename}" if error.filename else ""
            raise ValueError(f"endpoint {spec!r}: cannot read{where}: {error.strerror or error}") from None
    except Exception as error:  # the parsers raise many types; all mean 'bad'
        raise ValueError(f"malformed endpoint {spec!r}: {error}") from None
    kind, _, rest = spec.partition(":")
    if kind in ("tcp", "tcp6", "ssl"):
        port = rest.split(":", 1)[0]
        if "=" not in port:
            port_number(port)


def datagram_port(value: Any) -> str:
    """``off``, a port number, or ``udp:PORT[:interface=ADDR]``."""
    spec, simple = _off_or_number(value)
    if not simple:
        parse_udp(spec)
    return spec


def parse_udp(spec: str) -> tuple[int, str | None]:
    """``udp:PORT[:interface=ADDR]`` -> (port, interface or None)."""
    match = re.fullmatch(r"udp:(\d+)(?::interface=(.+))?", spec)
    if not match:
        raise ValueError(f"expected a port number, 'off' or udp:PORT[:interface=ADDR]; got {spec!r}")
    address = match.group(2)
    if address is not None:
        address = interface(address.replace("\\:", ":"))
    return port_number(match.group(1)), address


def rate(value: Any) -> tuple[float, float]:
    """``RATE`` or ``RATE/BURST`` per second; ``0`` turns the limit off.

    A bare rate gets a burst of twice the rate, the usual token-bucket default.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        raw = str(value)
    else:
        raw = text(value).strip()
    per_second, _, burst = raw.partition("/")
    try:
        speed = float(per_second)
        size = float(burst) if burst else 2 * speed
    except ValueError:
        raise ValueError(f"expected RATE or RATE/BURST, e.g. 20/40; got {value!r}") from None
    if speed < 0 or size < 0 or speed == float("inf") or size == float("inf"):
        raise ValueError(f"rate and burst must be finite and >= 0; got {value!r}")
    if speed > 0 and size < 1:
        raise ValueError(f"burst must be at least 1; got {value!r}")
    return speed, size


def byte_size(value: Any) -> int:
    """A size in bytes: ``1048576``, ``64k``, ``1M``, ``1MiB``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return count(value)
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text(value))
    if not match:
        raise ValueError(f"expected a size such as 65536, 64k or 1M; got {value!r}")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale
