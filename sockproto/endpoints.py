"""Port settings to Twisted endpoints, in one place.

Twisted's ``serverFromString`` rejects a bare port number, and UDP has no
endpoint syntax at all; every service's port option goes through here.
"""

from __future__ import annotations

import ipaddress

from sockproto import checks
from sockproto.config import ConfigError


def _escape(address: str) -> str:
    return address.replace(":", "\\:")


# Twisted's tcp:, tcp6: and ssl: bind every address when no interface= is
# given; ours bind --interface instead, as a bare port number does.
_TAKES_INTERFACE = ("tcp", "tcp6", "ssl")


def stream_description(
    spec: str, interface: str, tls_files: tuple[str, str] = ("", ""), service: str = "port"
) -> str | None:
    """``9000`` -> ``tcp:9000:interface=127.0.0.1``; ``off`` -> None.

    A ``tcp:``, ``tcp6:`` or ``ssl:`` endpoint that names no ``interface=``
    gets ``--interface`` (see :func:`_ipv6_interface` for ``tcp6:``), so no
    form of the port setting listens beyond it by surprise. An ``ssl:``
    endpoint that names no key gets ``--tls-cert``/``--tls-key``
    (``tls_files``), so ``--pop3-port ssl:995`` is POP3S with the suite's
    certificate; Twisted would otherwise look for ``server.pem``. ``service``
    names the setting in an error.
    """
    if spec == "off":
        return None
    if spec.isdigit():
        kind = "tcp6" if ipaddress.ip_address(interface).version == 6 else "tcp"
        return f"{kind}:{spec}:interface={_escape(interface)}"
    description = spec
    cert, key = tls_files
    if cert and checks.lacks_tls_files(spec):
        description = f"{description}:privateKey={_escape(key or cert)}:certKey={_escape(cert)}"
    kind = spec.partition(":")[0]
    if kind in _TAKES_INTERFACE and checks.endpoint_argument(spec, "interface") is None:
        address = _ipv6_interface(spec, interface, service) if kind == "tcp6" else interface
        description = f"{description}:interface={_escape(address)}"
    return description


def _ipv6_interface(spec: str, interface: str, service: str) -> str:
    """The address a ``tcp6:`` endpoint naming none binds: ``--interface`` if
    it is IPv6, else its IPv6 counterpart (``127.x`` -> ``::1``, ``0.0.0.0``
    -> ``::``). Another IPv4 address has none: the endpoint must name one."""
    address = ipaddress.ip_address(interface)
    if address.version == 6:
        return interface
    if address.is_loopback:
        return "::1"
    if address.is_unspecified:
        return "::"
    raise ConfigError(
        f"{service}: {spec} names no interface= and tcp6 cannot bind --interface {interface} (IPv4); "
        f"name one, e.g. {spec}:interface=\\:\\:1"
    )


# Connections the kernel may hold for us before we accept them. Twisted's
# default, 50, is too few for services that take 1000 clients: a burst over
# it (a reconnect storm, a room joining at once) loses connections the client
# believes open, and a server-speaks-first protocol (chat, POP3) leaves such a
# client waiting for a greeting that never comes. Linux caps it at
# net.core.somaxconn (4096 by default since 5.4).
LISTEN_BACKLOG = 1024
_TAKES_BACKLOG = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """The description with ``backlog=`` added where Twisted takes one and it
    does not set its own (``tcp:9000:backlog=4096`` and ``tcp:9000:0.0.0.0:4096``
    keep 4096)."""
    kind = description.partition(":")[0]
    if kind not in _TAKES_BACKLOG or checks.endpoint_argument(description, "backlog") is not None:
        return description
    return f"{description}:backlog={backlog}"


def loopback_only(description: str) -> bool:
    """Whether a stream endpoint description listens on loopback (or a UNIX
    socket) only. Unknown kinds (``systemd:``) count as beyond loopback."""
    kind = description.partition(":")[0]
    if kind == "unix":
        return True
    if kind not in _TAKES_INTERFACE:
        return False
    address = checks.endpoint_argument(description, "interface") or ""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def datagram_address(spec: str, interface: str) -> tuple[int, str] | None:
    """``9002`` or ``udp:9002[:interface=ADDR]`` -> (port, address); ``off`` -> None."""
    if spec == "off":
        return None
    if spec.isdigit():
        return int(spec), interface
    port, address = checks.parse_udp(spec)
    return port, address if address is not None else interface
