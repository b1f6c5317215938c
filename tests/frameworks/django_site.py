"""A Django project in one module, with durable streams by the middleware, as a Django user writes it::

    application = DurableStreamsMiddleware(get_asgi_application(), streams=streams)

Served in a subprocess (Django's settings are configured once per process):
``python -m uvicorn tests.frameworks.django_site:application``, storage from the environment
(see env.py). ``GET /hello`` is a Django view; ``/v1/stream`` and below are the streams.
"""

from __future__ import annotations

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="test-only-secret-key-for-the-django-site-0123456789",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
)

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

from durable_streams_asgi import DurableStreamsMiddleware  # noqa: E402

from .env import streams_from_env  # noqa: E402


def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse("hello from django", content_type="text/plain")


urlpatterns = [path("hello", hello)]

streams = streams_from_env()
application = DurableStreamsMiddleware(get_asgi_application(), streams=streams)
