"""The users table as the old code sees it (``old_name``) and as the new code does (``email``).

Neither is managed by Django's migrations: lockstep changes the table.
"""

from __future__ import annotations

from django.db import models


class UserBefore(models.Model):
    old_name = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "users"


class UserAfter(models.Model):
    email = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "users"
