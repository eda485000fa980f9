"""sockproto: the classic socket-programming servers, done right, on Twisted."""

__version__ = "0.1.0"
