"""Credential checkers from ``--auth`` (Twisted's strcred), shared by chat and POP3.

Three fixes to strcred and cred, made here once for every service:

- ``memory:USER:PASS`` stores ``str`` names and passwords, so it never matches
  the ``bytes`` credentials protocols build on Python 3: we store bytes.
- ``file:PATH`` also accepts the salted scrypt hashes ``python -m sockproto
  passwd`` writes (``USER:$scrypt$n=16384,r=8,p=1,pre=hmac-sha256$SALT$KEY``,
  or without ``pre=`` from earlier versions); plain
  ``USER:PASSWORD`` lines keep working.
- A cred Portal keeps one checker per credentials interface, so of several
  ``--auth`` options only the last would count: :func:`any_of` tries each.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import FilePasswordDB, ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import makeChecker
from twisted.internet import defer
from zope.interface import implementer

from sockproto.config import ConfigError, Settings

HASH_PREFIX = b"$scrypt$"
PREHASH = b"hmac-sha256"  # see _prehash
# Django's scrypt parameters: 16 MiB and some 50 ms per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_KEY_LENGTH = 32


def checkers(settings: Settings) -> list[ICredentialsChecker]:
    """One checker per ``--auth`` description, in the order given."""
    made = []
    for description in settings.suite.auth:
        kind, _, argument = description.partition(":")
        try:
            checker = makeChecker(description)
        except Exception as error:  # strcred raises several kinds; all mean 'bad'
            raise ConfigError(f"--auth {kind}: {error}") from None
        if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
            checker.users = {_bytes(user): _bytes(password) for user, password in checker.users.items()}
        elif isinstance(checker, FilePasswordDB):
            checker = SaltedFilePasswordDB(argument)
        made.append(checker)
    return made


@implementer(ICredentialsChecker)
class AnyOf:
    """Tries its checkers in order; the first that accepts the credentials
    decides. A checker that cannot take this kind of credentials is skipped."""

    def __init__(self, checkers: list[ICredentialsChecker]) -> None:
        self.checkers = checkers
        self.credentialInterfaces = tuple(
            dict.fromkeys(i for checker in checkers for i in checker.credentialInterfaces)
        )

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        for checker in self.checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            try:
                return (yield checker.requestAvatarId(credentials))
            except UnauthorizedLogin:
                continue
        raise UnauthorizedLogin()


def any_of(checkers: list[ICredentialsChecker]) -> ICredentialsChecker:
    """One checker for a Portal that accepts what any of ``checkers`` accepts."""
    return checkers[0] if len(checkers) == 1 else AnyOf(checkers)


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def hash_password(password: bytes, salt: bytes | None = None) -> bytes:
    """A salted scrypt hash in the form the file checker reads."""
    salt = os.urandom(16) if salt is None else salt
    key = _scrypt(_prehash(password, salt), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    params = b"n=%d,r=%d,p=%d,pre=%s" % (SCRYPT_N, SCRYPT_R, SCRYPT_P, PREHASH)
    return b"$".join([HASH_PREFIX.rstrip(b"$"), params, _b64(salt), _b64(key)])


def verify_password(password: bytes, stored: bytes) -> bool:
    """Whether ``password`` matches a hash from :func:`hash_password` (or
    from an earlier version, without ``pre=``)."""
    try:
        _, scheme, params, salt, key = stored.split(b"$")
        cost = dict(item.split(b"=", 1) for item in params.split(b","))
        n, r, p = int(cost[b"n"]), int(cost[b"r"]), int(cost[b"p"])
        salt_bytes = base64.b64decode(salt + b"=" * (-len(salt) % 4), validate=True)
        expected = base64.b64decode(key + b"=" * (-len(key) % 4), validate=True)
        if scheme != b"scrypt" or not (1 < n <= 2**20 and 0 < r <= 32 and 0 < p <= 16):
            return False
        pre = cost.get(b"pre")
        if pre == PREHASH:
            password = _prehash(password, salt_bytes)
        elif pre is not None:
            return False
        actual = _scrypt(password, salt_bytes, n, r, p, len(expected))
    except (ValueError, KeyError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def _prehash(password: bytes, salt: bytes) -> bytes:
    """The password as scrypt gets it: 32 bytes, an HMAC-SHA256 keyed by the salt.

    scrypt keys an HMAC with the password, and HMAC pads a short key with
    zero bytes and hashes a long one: on its own, ``s3cret`` and
    ``s3cret\\0`` would be the same password, and so would any password over
    64 bytes and its SHA-256. A fixed-length input has neither; keying it by
    the salt means a leaked plain SHA-256 of a password cannot be tried here.
    """
    return hmac.new(salt, password, hashlib.sha256).digest()


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int = _KEY_LENGTH) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=length)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


# Checked when the user does not exist, so that the answer takes as long.
_DUMMY_HASH = b"$scrypt$n=16384,r=8,p=1,pre=hmac-sha256$AAAAAAAAAAAAAAAAAAAAAA$" + b"A" * 43

Runner = Callable[..., "defer.Deferred[Any]"]


def _in_thread(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *args)


class SaltedFilePasswordDB(FilePasswordDB):
    """strcred's ``file:`` checker that also understands salted scrypt hashes.

    The hash runs in a thread (``run``), so one login does not stall every
    other connection for the ~50 ms scrypt takes. The file is read at each
    login, so ``passwd`` changes apply at once.
    """

    def __init__(self, filename: str, run: Runner = _in_thread) -> None:
        super().__init__(filename)
        self._run = run

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        plain = IUsernamePassword(credentials, None)
        try:
            user, stored = self.getUser(credentials.username)
        except KeyError:
            if plain is None:
                return defer.fail(UnauthorizedLogin())
            checked = self._run(verify_password, plain.password, _DUMMY_HASH)
            return checked.addCallback(lambda _: defer.fail(UnauthorizedLogin()))
        except UnauthorizedLogin:
            return defer.fail()
        if not stored.startswith(HASH_PREFIX):
            return defer.maybeDeferred(credentials.checkPassword, stored).addCallback(
                self._cbPasswordMatch, user
            )
        if plain is None:  # APOP and the like need the clear password
            return defer.fail(UnauthorizedLogin())
        return self._run(verify_password, plain.password, stored).addCallback(self._cbPasswordMatch, user)
