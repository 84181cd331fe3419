"""Settings of the reference server: only what the Channels tutorial's chat needs.

The channel layer is channels-redis' `RedisChannelLayer` with default settings (only the host),
exactly as the tutorial configures it. No database, no auth, no sessions.
"""

import os

SECRET_KEY = "reference-server-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["daphne", "channels"]
ROOT_URLCONF = "reference.urls"
ASGI_APPLICATION = "reference.asgi.application"
DATABASES: dict = {}
USE_TZ = True

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
