"""A Django project using `agent.integrations.django`, for the load test (served by gunicorn)
and the management-command test. See tests/support/load.py for what ``GET /users`` does.

`settings` reads `LOCKSTEP_TEST_URL` and `LOCKSTEP_TEST_APP_DSN`; `models` maps the users
table twice, before and after migration ``add_email``; `urls` holds the two views.
"""
