"""The hosted service: accounts, API keys, a durable usage ledger, limits, and model pages.

Turned on by ``e5kit serve --database-url ...``; see docs/service.md. Entry point:
:func:`e5kit.service.app.create_service_app`.
"""
