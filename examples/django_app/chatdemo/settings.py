"""Settings of the example project. Everything configurable comes from the environment.

No database: sessions live in signed cookies and the demo user is defined here, so the project
runs with no setup step (no ``migrate``).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-dev-only-set-DJANGO_SECRET_KEY-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "").lower() in ("1", "true", "yes")
ALLOWED_HOSTS = ["*"]

# No models of its own and no contrib app that needs tables.
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "chatdemo.urls"

# The session is the cookie itself, signed with SECRET_KEY: nothing to store server-side. The
# cookie is HttpOnly and SameSite=Lax (Django's defaults); set DJANGO_SECURE_COOKIES=1 behind HTTPS.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = os.environ.get("DJANGO_SECURE_COOKIES", "") == "1"

USE_TZ = True

# The one demo user, username -> password.
DEMO_USERS = {os.environ.get("DEMO_USERNAME", "demo"): os.environ.get("DEMO_PASSWORD", "demo")}

# Durable Streams: Redis when REDIS_URL is set (any number of processes), else memory (one process).
DURABLE_STREAMS_REDIS_URL = os.environ.get("REDIS_URL") or None
DURABLE_STREAMS_KEY_PREFIX = os.environ.get("DURABLE_STREAMS_KEY_PREFIX", "ds:")
DURABLE_STREAMS_LONG_POLL_TIMEOUT = float(os.environ.get("DURABLE_STREAMS_LONG_POLL_TIMEOUT", "30"))
# Subscription webhooks to this machine over http: development and tests only.
DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS = os.environ.get("DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS") == "1"
# Development only: let anyone write streams over HTTP (e.g. to run the protocol's conformance
# suite against this project). Never set it in production.
DEMO_OPEN_WRITES = os.environ.get("DEMO_OPEN_WRITES") == "1"

# The fake model: seconds between tokens, and how long (sliding, seconds) a chat answer's stream lives.
CHAT_TOKEN_DELAY = float(os.environ.get("CHAT_TOKEN_DELAY", "0.05"))
CHAT_STREAM_TTL = int(os.environ.get("CHAT_STREAM_TTL", "3600"))
# Seconds after which another process ends an answer whose process died (stopped renewing it).
CHAT_LEASE_TTL = float(os.environ.get("CHAT_LEASE_TTL", "15"))
