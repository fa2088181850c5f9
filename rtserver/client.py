"""The Python client, from the `rtserver-client` distribution (clients/python).

Kept as a module of the server package so `from rtserver.client import TTSClient` keeps
working; the code lives in one place, `rtserver_client`.
"""

from rtserver_client.client import *  # noqa: F403
from rtserver_client.client import __all__  # noqa: F401 - the same public names
