from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("login", views.login),
    path("logout", views.logout),
    path("api/me", views.me),
    path("api/chat", views.chat),
    path("api/chat/<slug:chat_id>/stream", views.chat_stream),
]
