"""zapkeep: a WhatsApp bot daemon whose session survives every redeploy."""

__version__ = "1.3.0"
