"""Create the demo data `make run` shows: a bot with templates, a public lobby, two users."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from chat.models import Bot, BotTemplate, Membership, Room

DEMO_PASSWORD = "parley-demo"

TEMPLATES = [
    (BotTemplate.Match.KEYWORD, "hello, hi, hey",
     "Hello {user}! Ask me about 'hours', 'price' or say 'my name is ...'.", 10),
    (BotTemplate.Match.KEYWORD, "hours, open", "We are open 09:00-18:00 UTC. It is {time} UTC now, {user}.", 20),
    (BotTemplate.Match.KEYWORD, "price, cost", "Parley is free and open source, {user}.", 30),
    (BotTemplate.Match.REGEX, r"my name is (?P<name>\w+)", "Nice to meet you, {name}! I will call you {name}.", 40),
]


class Command(BaseCommand):
    help = "Create demo users (alice, bob), a public 'lobby' room and the 'helpbot' bot. Idempotent."

    def handle(self, *args, **options):
        User = get_user_model()
        users = []
        for name in ("alice", "bob"):
            user, created = User.objects.get_or_create(username=name)
            if created:
                user.set_password(DEMO_PASSWORD)
                user.save()
            users.append(user)
        bot_user, _ = User.objects.get_or_create(username="helpbot")
        bot, created = Bot.objects.get_or_create(
            user=bot_user,
            defaults={
                "description": "Answers from templates",
                "default_reply": "Sorry {user}, I only know hello, hours, price and 'my name is ...'.",
            },
        )
        if created:
            for match, pattern, reply, priority in TEMPLATES:
                BotTemplate.objects.create(bot=bot, match=match, pattern=pattern, reply=reply, priority=priority)
        lobby = Room.objects.filter(kind=Room.Kind.GROUP, name="lobby").first()
        if lobby is None:
            lobby = Room.objects.create(name="lobby", kind=Room.Kind.GROUP, private=False, created_by=users[0])
        for user in users:
            Membership.objects.get_or_create(room=lobby, user=user)
        self.stdout.write(
            f"demo users alice and bob (password {DEMO_PASSWORD!r}), room 'lobby' #{lobby.pk}, bot 'helpbot'"
        )
