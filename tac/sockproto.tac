# The sockproto suite as a twistd application: ``twistd -ny tac/sockproto.tac``.
# Settings come from $SOCKPROTO_CONFIG, else ./sockproto.toml if present, else
# the defaults: the same model and the same services as ``twistd sockproto``.
from twisted.application.service import Application

from sockproto.config import ConfigError, load
from sockproto.service import make_service

try:
    settings, config_path = load()
    service = make_service(settings, config_path=config_path)
except ConfigError as error:
    raise SystemExit(f"sockproto: error: {error}") from None

application = Application("sockproto")
service.setServiceParent(application)
