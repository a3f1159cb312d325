"""The views: ``/users`` picks its model by migration ``add_email``; ``/ready`` for probes."""

from __future__ import annotations

import time

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.urls import path

from agent.integrations.django import agent, choose, is_new
from tests.support.django_app.models import UserAfter, UserBefore
from tests.support.load import MIGRATION_NAME, WORK_BEFORE_QUERY


def users(request: HttpRequest) -> JsonResponse:
    # LockstepMiddleware wraps the request in lockstep_using("add_email").
    model = choose(MIGRATION_NAME, UserBefore, UserAfter)
    time.sleep(WORK_BEFORE_QUERY)
    try:
        rows = list(model.objects.order_by("id"))
    except DatabaseError as exc:
        return JsonResponse({"error": str(exc), "new": is_new(MIGRATION_NAME)}, status=500)
    return JsonResponse({"new": is_new(MIGRATION_NAME), "rows": len(rows)})


def ready(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"connected": agent().connected})


urlpatterns = [path("users", users), path("ready", ready)]
