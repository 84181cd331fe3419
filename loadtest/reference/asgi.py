"""ASGI entry point of the reference server (the tutorial's, minus the auth and origin middleware:
the load client sends no cookies and no Origin, and the tutorial's AuthMiddlewareStack needs a
session database this server does not have)."""

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reference.settings")
django_asgi_app = get_asgi_application()

from reference.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
