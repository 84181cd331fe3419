"""Django settings for Parley. Values come from `parley.config` (environment variables)."""

from __future__ import annotations

from pathlib import Path

import dj_database_url

from chat.contract import WORKER_CHANNELS
from parley.config import CONFIG

BASE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BASE_DIR.parent

CONFIG.check_secret_key()
DEBUG = CONFIG.debug
SECRET_KEY = CONFIG.secret_key
ALLOWED_HOSTS = CONFIG.allowed_hosts
CSRF_TRUSTED_ORIGINS = [o for o in CONFIG.origins if "://" in o]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "parley.urls"
ASGI_APPLICATION = "parley.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict:
    db = dj_database_url.parse(CONFIG.database_url, conn_max_age=CONFIG.db_conn_max_age, conn_health_checks=True)
    if db["ENGINE"] == "django.db.backends.sqlite3":
        name = Path(db["NAME"])
        if not name.is_absolute():
            name = REPO_DIR / name
        name.parent.mkdir(parents=True, exist_ok=True)
        db["NAME"] = str(name)
        # Protocol and worker processes write to the same file: WAL lets readers run beside the
        # writer, IMMEDIATE transactions take the write lock up front instead of failing mid-way.
        db["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
        # Tests start real server processes that must see the test database: use a file.
        db["TEST"] = {"NAME": str(name.with_name(name.stem + "-test.sqlite3"))}
    return db


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Django's standard set: not too like the username, at least 8 characters, not one of the
# 20,000 most common passwords, not all digits. Registration and password changes check them.
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 8}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
LOGIN_URL = "/login/"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "parley.layers.ParleyChannelLayer",
        "CONFIG": {
            "hosts": CONFIG.redis_urls,
            "prefix": CONFIG.channel_prefix,
            "expiry": CONFIG.channel_expiry,
            "capacity": CONFIG.inbox_capacity,
            "channel_capacity": {name: CONFIG.worker_channel_capacity for name in WORKER_CHANNELS},
            "pool_size": CONFIG.redis_pool_size,
            "pool_timeout": CONFIG.redis_pool_timeout,
            "socket_timeout": CONFIG.redis_timeout,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": CONFIG.log_level},
    "loggers": {"django.channels.server": {"level": "WARNING"}, "daphne": {"level": "WARNING"}},
}
