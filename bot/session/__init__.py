"""The session's persistence: the local store, its mirror, snapshots, restores and the lease."""
