"""Settings of the reference servers: only what the Channels tutorial's chat and the hub need.

The channel layer is channels-redis' `RedisChannelLayer` with default settings (only the host),
exactly as the tutorial configures it; the hub uses no channel layer, only REDIS_URL. No
database, no auth, no sessions.
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
TIME_ZONE = "UTC"  # log times as the other servers of the bench write them

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}

# The level in every line: the benchmark tells a reference's errors from its warnings by it.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
