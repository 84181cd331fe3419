"""Bot replies from templates: the first matching template (by priority) answers, else the default.

Templates are keyword lists (`hello, hi, hey`: any of them as a whole word) or regular
expressions whose named groups become variables. Variables in replies: `{user}` (the sender's
name), `{bot}`, `{message}` (what the user wrote), `{time}` (UTC, HH:MM) and named groups.
Unknown variables stay as written, so a typo in a template shows instead of crashing the worker.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from chat.models import Bot, BotTemplate

_VARIABLE = re.compile(r"\{(\w+)\}")


def render(template: str, variables: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


def match(template: BotTemplate, text: str) -> dict[str, str] | None:
    """Variables captured when `template` matches `text`, or None."""
    if template.match == BotTemplate.Match.REGEX:
        try:
            found = re.search(template.pattern, text, re.IGNORECASE)
        except re.error:
            return None
        return {k: v for k, v in found.groupdict().items() if v is not None} if found else None
    words = [w.strip() for w in template.pattern.split(",") if w.strip()]
    for word in words:
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE):
            return {"keyword": word}
    return None


def reply_for(bot: Bot, sender_name: str, text: str) -> str:
    variables = {
        "user": sender_name,
        "bot": bot.user.get_username(),
        "message": text,
        "time": datetime.now(UTC).strftime("%H:%M"),
    }
    for template in bot.templates.all():
        captured = match(template, text)
        if captured is not None:
            return render(template.reply, {**variables, **captured})
    return render(bot.default_reply, variables)


def answer(bot_id: int, sender_name: str, text: str) -> tuple[int, str]:
    """(bot user id, reply text) for a message sent to the bot."""
    bot = Bot.objects.select_related("user").get(pk=bot_id)
    return bot.user_id, reply_for(bot, sender_name, text)
