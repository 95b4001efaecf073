"""The session's persistence: change capture, the mirror, the store document, backups, restores, leases."""
