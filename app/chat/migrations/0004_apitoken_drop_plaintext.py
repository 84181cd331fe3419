"""API tokens, step 3 of 3: drop the plaintext column; the hash becomes the unique key."""

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0003_hash_existing_tokens"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveField("apitoken", "key"),
        migrations.AlterField("apitoken", "key_hash", models.CharField(max_length=64, unique=True)),
        migrations.AlterField("apitoken", "expires_at", models.DateTimeField()),
        migrations.AddIndex(
            "apitoken", models.Index(fields=["user", "created_at"], name="apitoken_user_created")
        ),
    ]
