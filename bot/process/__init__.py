"""The process itself: configuration, errors, logs, child processes, the retry schedule."""
