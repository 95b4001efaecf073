"""The WhatsApp connection: the client, pairing, the send gateway and the connection rounds."""
