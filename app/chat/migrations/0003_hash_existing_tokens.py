"""API tokens, step 2 of 3: hash the plaintext keys of existing tokens, so every token issued
before the upgrade keeps working (clients present the same plaintext; its hash now matches).

Existing tokens expire a full PARLEY_TOKEN_TTL_DAYS after the upgrade, not after their creation:
nothing breaks on the day of the deploy. A separate migration from the schema changes, because
PostgreSQL refuses to alter a table with row updates pending in the same transaction.
"""

import hashlib
from datetime import timedelta

from django.db import migrations
from django.utils import timezone


def hash_keys(apps, schema_editor) -> None:
    from parley.config import CONFIG

    ApiToken = apps.get_model("chat", "ApiToken")
    expires = timezone.now() + timedelta(days=CONFIG.token_ttl_days)
    for token in ApiToken.objects.filter(key_hash__isnull=True).only("pk", "key").iterator(chunk_size=2000):
        ApiToken.objects.filter(pk=token.pk).update(
            key_hash=hashlib.sha256(token.key.encode()).hexdigest(), expires_at=expires
        )


class Migration(migrations.Migration):
    dependencies = [("chat", "0002_apitoken_hash_fields")]

    # The plaintext is gone after 0004: there is nothing to reverse to.
    operations = [migrations.RunPython(hash_keys, migrations.RunPython.noop, elidable=True)]
