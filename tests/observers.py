"""Log observer factories for ``twistd --logger`` tests."""

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_to_stdout() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout)
