"""The process itself: configuration, errors, logs, child processes and the rules console."""
