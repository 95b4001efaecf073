"""Messages: the chatbot and its rules, the outbox, webhooks."""
