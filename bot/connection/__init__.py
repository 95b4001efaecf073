"""The WhatsApp connection: the neonize adapter, the client process, pairing, the send gateway, events."""
