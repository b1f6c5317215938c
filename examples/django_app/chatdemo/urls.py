from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("static/<str:name>", views.bundle),
    path("login", views.login),
    path("logout", views.logout),
    path("api/me", views.me),
]
