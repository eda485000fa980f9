"""twistd plugin: ``twistd -n sockproto``; everything else is loaded lazily."""

from twisted.application.service import ServiceMaker

sockproto = ServiceMaker(
    "sockproto",
    "sockproto.tap",
    "Classic socket servers: strip, chat, UDP, HTTP and POP3 in one process",
    "sockproto",
)
