"""Credential checkers from ``--auth`` (Twisted's strcred), shared by chat and POP3."""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.strcred import makeChecker

from sockproto.config import ConfigError, Settings


def checkers(settings: Settings) -> list[ICredentialsChecker]:
    """One checker per ``--auth`` description, in the order given."""
    made = []
    for description in settings.suite.auth:
        try:
            made.append(_with_bytes_names(makeChecker(description)))
        except Exception as error:  # strcred raises several kinds; all mean 'bad'
            raise ConfigError(f"--auth {description.split(':', 1)[0]}: {error}") from None
    return made


def _with_bytes_names(checker: ICredentialsChecker) -> ICredentialsChecker:
    """strcred's ``memory:`` checker keeps names and passwords as ``str``, but
    credentials carry ``bytes`` (as ``file:`` and the protocols expect), so no
    ``memory:`` login could ever succeed: store them as bytes."""
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {_utf8(name): _utf8(password) for name, password in checker.users.items()}
    return checker


def _utf8(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value
