"""The twistd front door: ``twistd -n sockproto [options]``.

Options are generated from the settings model, so every option has the name,
default and check that the TOML file has.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import strcred
from twisted.python import usage

from sockproto.config import ConfigError, RawValues, load, show, specs
from sockproto.service import make_service

COMMAND = "twistd sockproto"


def _help(spec: Any) -> str:
    key = spec.toml
    return f"{spec.help} [default: {show(spec.default)}; config: {key}]"


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[options]"
    longdesc = (
        "Runs the sockproto suite: strip (9000), chat (9001), UDP (9002), HTTP (8080) "
        "and POP3 (1110). A port option takes a port number (bound on --interface), a "
        "Twisted endpoint description (tcp6:9000:interface=\\:\\:1, ssl:..., unix:...) "
        "or 'off'. Settings come from --config FILE, else $SOCKPROTO_CONFIG, else "
        "./sockproto.toml if present; options given here win."
    )
    optParameters = [
        ["config", None, None, "TOML settings file (see sockproto.example.toml)."],
        *([spec.cli, None, None, _help(spec)] for spec in specs() if not spec.flag and spec.key != "auth"),
    ]
    optFlags = [[spec.cli, None, _help(spec)] for spec in specs() if spec.flag]

    settings: Any = None
    config_path: Any = None

    def __init__(self) -> None:
        super().__init__()
        self["auth"] = []

    def opt_auth(self, description: str) -> None:
        """Credential checker for chat logins and POP3 (strcred syntax); repeatable."""
        super().opt_auth(description)  # checks it now, with strcred's own messages
        self["auth"].append(description)

    def parseOptions(self, options: Any = None) -> None:
        # twistd answers a UsageError with the whole help text; one line is
        # clearer, and the exit status must say it failed.
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            raise SystemExit(f"{COMMAND}: error: {error} (see {COMMAND} --help)") from None

    def postOptions(self) -> None:
        given: RawValues = {}
        for spec in specs():
            if spec.flag:
                value = True if self[spec.cli] else None
            elif spec.section == "suite" and spec.key == "auth":
                value = self["auth"] or None
            else:
                value = self[spec.cli]
            if value is not None:
                given[(spec.section, spec.key)] = (value, f"--{spec.cli}")
        try:
            self.settings, self.config_path = load(self["config"], given)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options: Options) -> Any:
    # A service may find its settings unusable together (POP3 without --auth
    # beyond loopback, a TLS key that does not match): twistd would print a
    # traceback; an operator needs one line and a failing exit status.
    try:
        return make_service(options.settings, config_path=options.config_path)
    except ConfigError as error:
        raise SystemExit(f"{COMMAND}: error: {error}") from None
