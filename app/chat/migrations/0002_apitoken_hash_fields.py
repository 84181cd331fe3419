"""API tokens, step 1 of 3: the columns for the hash, expiry, last use and a name."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("chat", "0001_initial")]

    operations = [
        # Nullable until 0003 has filled them for the existing rows.
        migrations.AddField("apitoken", "key_hash", models.CharField(max_length=64, null=True)),
        migrations.AddField("apitoken", "expires_at", models.DateTimeField(null=True)),
        migrations.AddField("apitoken", "last_used", models.DateTimeField(blank=True, null=True)),
        migrations.AddField("apitoken", "name", models.CharField(blank=True, default="", max_length=100)),
    ]
