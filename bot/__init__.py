"""zapkeep: a WhatsApp bot daemon whose session survives every redeploy."""
