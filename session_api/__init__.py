"""The admin HTTP API (Flask blueprint and app factory)."""
