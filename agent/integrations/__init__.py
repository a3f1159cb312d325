"""Ready-made glue between the agent and the usual Python app servers.

One module per framework, each importing its framework itself, so `import agent` never needs
Django, Flask or Starlette: `agent.integrations.starlette` (FastAPI, Starlette: a lifespan),
`agent.integrations.django` (an AppConfig and a middleware), `agent.integrations.flask` (an
extension), `agent.integrations.gunicorn` (the fork hooks). What they share, one agent per
process and the per-request choice of a query set, is `agent.integrations.common`.
"""
