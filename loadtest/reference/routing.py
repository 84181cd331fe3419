from django.urls import re_path

from . import consumers, hub

websocket_urlpatterns = [
    re_path(r"ws/chat/(?P<room_name>\w+)/$", consumers.ChatConsumer.as_asgi()),
    re_path(r"ws/hub/(?P<room_name>\w+)/$", hub.HubConsumer.as_asgi()),
]
