"""Credential checkers from ``--auth`` (Twisted's strcred), shared by chat and POP3."""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.strcred import makeChecker

from sockproto.config import ConfigError, Settings


def checkers(settings: Settings) -> list[ICredentialsChecker]:
    """One checker per ``--auth`` description, in the order given."""
    made = []
    for description in settings.suite.auth:
        try:
            made.append(makeChecker(description))
        except Exception as error:  # strcred raises several kinds; all mean 'bad'
            raise ConfigError(f"--auth {description.split(':', 1)[0]}: {error}") from None
    return made
