"""The interaction logger's HTTP API (FastAPI). Handlers are thin: nightowl.day.logger does the work.

app.py assembles the app; deps.py holds what the routes share (the runtime, the caller);
routes/ has one router per resource; errors.py gives every error one shape; body_limit.py
refuses oversized bodies before they are read.
"""

from nightowl.api.app import create_app

__all__ = ["create_app"]
