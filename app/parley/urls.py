from django.contrib.auth import views as auth_views
from django.urls import path

from chat import views

urlpatterns = [
    path("", views.index, name="index"),
    path("login/", views.ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="/login/"), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("api/auth/token", views.issue_token),
    path("api/auth/register", views.register),
    path("api/auth/logout", views.logout_view),
    path("api/auth/logout-all", views.logout_all),
    path("api/me", views.me),
    path("api/rooms", views.rooms),
    path("api/rooms/<int:room_id>/members", views.members),
    path("api/rooms/<int:room_id>/members/<str:username>", views.member),
    path("api/rooms/<int:room_id>/leave", views.leave),
    path("api/rooms/<int:room_id>/messages", views.messages),
    path("api/dms", views.dms),
]
