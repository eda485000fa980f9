"""The one settings model: every option's name, default, check and help.

The command line (``tap.py``) and the TOML file both feed :func:`build`, so
nothing downstream knows which front door was used. A TOML table is a service
(``[chat]``), a key is the option without the service prefix (``--chat-max-clients``
is ``[chat] max_clients``); options of the suite as a whole are top-level keys.
The strip server, the first service, owns the unprefixed options (``--port``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockproto import checks

CONFIG_ENV = "SOCKPROTO_CONFIG"
DEFAULT_CONFIG = "sockproto.toml"


class ConfigError(Exception):
    """A setting is wrong; the message names it and says why."""


def option(default: Any, check: checks.Check, help: str, *, flag: bool = False, cli: str = "") -> Any:
    """One setting; ``cli`` overrides the derived command-line name."""
    return field(default=default, metadata={"check": check, "help": help, "flag": flag, "cli": cli})


@dataclass(frozen=True)
class SuiteSettings:
    interface: str = option(
        "127.0.0.1",
        checks.interface,
        "Address that bare port numbers, and tcp:/tcp6:/ssl: endpoints naming no interface=, listen on.",
    )
    auth: tuple[str, ...] = option(
        (),
        checks.auth_descriptions,
        "Credential checker for chat logins and POP3, in Twisted's strcred syntax "
        "(memory:USER:PASS, file:PATH, unix); repeatable. See --help-auth.",
    )
    tls_cert: str = option("", checks.optional_path, "PEM certificate for TLS (POP3 STLS).")
    tls_key: str = option("", checks.optional_path, "PEM private key for TLS (POP3 STLS).")
    shutdown_grace: float = option(
        10.0,
        checks.seconds,
        "At a stop (SIGTERM), seconds the connections get to finish the work in progress "
        "(an HTTP response, a POP3 RETR) before they are cut (0: cut at once).",
    )
    workers: int = option(
        1,
        checks.workers,
        "Processes serving strip and HTTP: the main one and N-1 workers sharing its listening sockets.",
    )
    refusal_log_rate: tuple[float, float] = option(
        (5.0, 10.0),
        checks.rate,
        "Connections refused over a --max-clients cap logged one line each per second, RATE[/BURST]; "
        "the rest are summed up (0: all).",
    )
    suite_max_output: int = option(
        256 * 1024 * 1024,
        checks.byte_size,
        "Output held for clients that have not read it, all services of a process together; over it "
        "the clients holding the most are dropped first (0: no cap).",
    )
    log_rate: tuple[float, float] = option(
        (50.0, 100.0),
        checks.rate,
        "Lines a second that clients can cause in the twistd log, ours and Twisted's (timeouts, bad "
        "requests, failed logins), for each service, RATE[/BURST]; the rest are counted and summed up "
        "every 10 s (0: all). Access lines, datagrams and refusals have budgets of their own "
        "(--http-log-rate, --udp-log-rate, --refusal-log-rate) and are not charged here.",
    )
    logins_in_flight: int = option(
        2,
        checks.positive,
        "Chat and POP3 logins from one address with failures counted (an IPv6 one's /64) checked or "
        "waiting their answer at once, both services together; one more is refused at once, its "
        "password unchecked: a guesser's guesses per penalty, however many connections it opens.",
    )


@dataclass(frozen=True)
class StripSettings:
    port: str = option("9000", checks.stream_port, "Strip-whitespace server: port, endpoint or off.")
    max_clients: int = option(10, checks.count, "Most strip clients at once (0: no cap).")
    max_line: int = option(65536, checks.positive, "Longest strip line, in bytes.")
    idle_timeout: float = option(
        300.0, checks.seconds, "Disconnect a silent strip client after so many seconds (0: never)."
    )


@dataclass(frozen=True)
class ChatSettings:
    port: str = option("9001", checks.stream_port, "Chat server: port, endpoint or off.")
    max_clients: int = option(1000, checks.count, "Most chat clients at once (0: no cap).")
    max_line: int = option(4096, checks.positive, "Longest chat line, in bytes.")
    idle_timeout: float = option(
        0.0, checks.seconds, "Disconnect a silent chat client after so many seconds (0: never)."
    )
    history: int = option(20, checks.count, "Lines replayed to a newcomer.")
    max_pending: int = option(
        1024 * 1024, checks.byte_size, "Output a chat client may leave unread before it is dropped."
    )
    max_output: int = option(
        128 * 1024 * 1024,
        checks.byte_size,
        "Output held for all chat clients together; over it the clients holding the most are dropped "
        "first (0: only --suite-max-output).",
    )
    rate: tuple[float, float] = option(
        (20.0, 40.0), checks.rate, "Lines per second a chat client may send, RATE[/BURST] (0: off)."
    )
    auth: bool = option(False, checks.flag, "Require /login against --auth.", flag=True)
    login_delay: float = option(
        1.0,
        checks.seconds,
        "Wait before answering a chat login from an address with failures (on chat or POP3): "
        "S * 2**(n-1) for its n-th failure, and for a right password after n failures, at most "
        "30 s; an address with no failures is answered at once (0: no wait).",
    )


@dataclass(frozen=True)
class UdpSettings:
    port: str = option("9002", checks.datagram_port, "UDP responder: port, udp:PORT[:interface=ADDR] or off.")
    mode: str = option(
        "daytime",
        checks.one_of("daytime", "echo", "strip", "time"),
        "What UDP answers: daytime, echo, strip or time.",
    )
    rate: tuple[float, float] = option(
        (20.0, 40.0), checks.rate, "Answers per second to one source, RATE[/BURST] (0: off)."
    )
    no_amplify: bool = option(
        False, checks.flag, "Never answer with more bytes than the datagram had.", flag=True
    )
    max_sources: int = option(
        10000,
        checks.positive,
        "Most source addresses whose UDP rate is tracked at once (the least recent are forgotten).",
    )
    log_rate: tuple[float, float] = option(
        (50.0, 100.0),
        checks.rate,
        "Datagrams logged one line each per second, RATE[/BURST]; the rest are summed up (0: all).",
    )


@dataclass(frozen=True)
class HttpSettings:
    port: str = option("8080", checks.stream_port, "HTTP responder: port, endpoint or off.")
    message: str = option(
        "", checks.text, "Body of GET / (none: a greeting naming sockproto and its version)."
    )
    root: str = option("", checks.optional_folder, "Folder served under /files/ (none: /files/ is off).")
    listing: bool = option(False, checks.flag, "List folders under /files/.", flag=True)
    access_log: str = option("", checks.optional_path, "Access log file (none: the twistd log).")
    log_rate: tuple[float, float] = option(
        (50.0, 100.0),
        checks.rate,
        "Requests logged one line each per second in the twistd log, RATE[/BURST]; the rest are summed "
        "up (0: all; --http-access-log FILE gets every line).",
    )
    max_clients: int = option(1000, checks.count, "Most HTTP connections at once (0: no cap).")
    idle_timeout: float = option(
        60.0,
        checks.seconds,
        "Seconds an HTTP connection may sit idle, take to send one request, or go without reading "
        "(0: never).",
    )
    max_body: int = option(
        1024 * 1024, checks.byte_size, "Largest request body, in bytes (413 above; 0: no body at all)."
    )
    max_output: int = option(
        128 * 1024 * 1024,
        checks.byte_size,
        "Output held for all HTTP clients together; over it the clients holding the most are dropped "
        "first (0: only --suite-max-output).",
    )
    linger_time: float = option(
        5.0,
        checks.seconds,
        "Seconds a refused HTTP request's connection (413, 400, ...) keeps reading and dropping what "
        "the client still sends, so it gets the answer, not a reset (0: close at once).",
    )
    linger_bytes: int = option(
        16 * 1024 * 1024,
        checks.byte_size,
        "Most bytes read and dropped after a refusal (see --http-linger-time) before the close "
        "(curl over loopback sends a few MB more before it reads a 413).",
    )


@dataclass(frozen=True)
class Pop3Settings:
    port: str = option("1110", checks.stream_port, "POP3 server: port, endpoint or off.")
    maildir: str = option(
        "mail",
        checks.optional_path,
        "Root of the per-user Maildirs (ROOT/USER/{cur,new,tmp}).",
        cli="maildir",
    )
    max_clients: int = option(100, checks.count, "Most POP3 sessions at once (0: no cap).")
    idle_timeout: float = option(600.0, checks.seconds, "Close an idle POP3 session after so many seconds.")
    require_tls: bool = option(
        False, checks.flag, "Refuse any login (USER, APOP, AUTH) before STLS.", flag=True
    )
    auth_delay: float = option(
        1.0,
        checks.seconds,
        "Delay before answering a POP3 login from an address with failures (on POP3 or chat): "
        "S * 2**(n-1) for its n-th failure, and for a right password after n failures, at most "
        "30 s; an address with no failures is answered at once (0: no delay).",
    )


@dataclass(frozen=True)
class Settings:
    suite: SuiteSettings = field(default_factory=SuiteSettings)
    strip: StripSettings = field(default_factory=StripSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    udp: UdpSettings = field(default_factory=UdpSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    pop3: Pop3Settings = field(default_factory=Pop3Settings)


SERVICES = ("strip", "chat", "udp", "http", "pop3")


@dataclass(frozen=True)
class Spec:
    """One option, as both front doors see it."""

    section: str  # "suite" for top-level keys
    key: str
    default: Any
    check: checks.Check
    help: str
    flag: bool
    cli_name: str = ""

    @property
    def cli(self) -> str:
        if self.cli_name:
            return self.cli_name
        name = self.key.replace("_", "-")
        return name if self.section in ("suite", "strip") else f"{self.section}-{name}"

    @property
    def toml(self) -> str:
        return self.key if self.section == "suite" else f"[{self.section}] {self.key}"


def specs() -> Iterator[Spec]:
    for section in dataclasses.fields(Settings):
        for item in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
            meta = item.metadata
            yield Spec(
                section.name, item.name, item.default, meta["check"], meta["help"], meta["flag"], meta["cli"]
            )


def show(value: Any) -> str:
    """A default as a person would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:g}/{value[1]:g}"
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


# (section, key) -> (raw value, where it came from, for error messages)
RawValues = dict[tuple[str, str], tuple[Any, str]]


def build(values: RawValues) -> Settings:
    """Check every given value and return the settings; defaults fill the rest."""
    known = {(spec.section, spec.key): spec for spec in specs()}
    checked: dict[str, dict[str, Any]] = {name: {} for name in ("suite", *SERVICES)}
    for (section, key), (raw, origin) in values.items():
        spec = known.get((section, key))
        if spec is None:
            raise ConfigError(f"{origin}: unknown setting")
        try:
            checked[section][key] = spec.check(raw)
        except ValueError as error:
            raise ConfigError(f"{origin}: {error}") from None
    sections = {name: _section_type(name)(**kwargs) for name, kwargs in checked.items()}
    settings = Settings(**sections)
    _check_together(settings)
    return settings


def _check_together(settings: Settings) -> None:
    """Settings that are each fine but do not work together."""
    if settings.suite.tls_key and not settings.suite.tls_cert:
        raise ConfigError("--tls-key: needs --tls-cert too")
    if settings.chat.auth and settings.chat.port != "off" and not password_checkers(settings.suite.auth):
        raise ConfigError(
            "--chat-auth ([chat] auth): no one could log in; give the accounts with --auth "
            "(e.g. --auth memory:alice:secret or --auth file:users.txt)"
        )


def password_checkers(descriptions: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--auth`` descriptions whose checkers take a user name and password."""
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.strcred import findCheckerFactory

    return tuple(
        description
        for description in descriptions
        if IUsernamePassword in findCheckerFactory(description.split(":", 1)[0]).credentialInterfaces
    )


def _section_type(section: str) -> type:
    return next(f.default_factory for f in dataclasses.fields(Settings) if f.name == section)  # type: ignore[return-value]


def read_toml(path: str | os.PathLike[str]) -> RawValues:
    """Raw values from a TOML file, each labelled with the file and key."""
    name = str(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{name}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: not valid TOML: {error}") from None
    values: RawValues = {}
    for key, value in document.items():
        if key in SERVICES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: [{key}] must be a table")
            for inner, raw in value.items():
                values[(key, inner)] = (raw, f"{name}: [{key}] {inner}")
        else:
            values[("suite", key)] = (value, f"{name}: {key}")
    return values


def find_config_file(explicit: str | None = None) -> Path | None:
    """--config FILE, else $SOCKPROTO_CONFIG, else ./sockproto.toml if present."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    local = Path(DEFAULT_CONFIG)
    return local if local.is_file() else None


def load(explicit: str | None = None, overrides: RawValues | None = None) -> tuple[Settings, Path | None]:
    """Settings from the config file (if any) with ``overrides`` on top."""
    path = find_config_file(explicit)
    values = read_toml(path) if path else {}
    values.update(overrides or {})
    return build(values), path


def as_data(settings: Settings) -> dict[str, dict[str, Any]]:
    """Checked settings as plain data (JSON), for a worker process."""
    return dataclasses.asdict(settings)


def from_data(data: dict[str, dict[str, Any]]) -> Settings:
    """The inverse of :func:`as_data` (the values were checked already)."""
    sections = {}
    for name, values in data.items():
        kind = _section_type(name)
        tuples = {item.name for item in dataclasses.fields(kind) if isinstance(item.default, tuple)}
        sections[name] = kind(**{k: tuple(v) if k in tuples else v for k, v in values.items()})
    return Settings(**sections)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f'"{value[0]:g}/{value[1]:g}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}" if value != int(value) else f"{int(value)}"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml() -> str:
    """The commented example file: every key, its default, and its option."""
    out = [
        "# sockproto settings: every key with its default. Copy to sockproto.toml",
        "# (read from the current folder), or name it with --config FILE or",
        "# $SOCKPROTO_CONFIG. Command-line options win over this file.",
        "",
    ]
    section = None
    for spec in specs():
        if spec.section != section:
            section = spec.section
            if section != "suite":
                out += ["", f"[{section}]"]
        out.append(f"# {spec.help} (--{spec.cli})")
        out.append(f"{spec.key} = {_toml_value(spec.default)}")
    return "\n".join(out) + "\n"
