"""The storage layer, one module per concern, each with its named SQL beside the methods that use it.

``database`` (top level) is the door callers use; here: ``records`` (what crosses the boundary),
``core`` (transactions, fencing), ``upgrades`` (the numbered schema steps), ``sessions``,
``resealing``, ``leases``, ``messages``, ``outbox``, ``events``, ``registry`` (which sessions
exist, their owners' live state), ``commands`` (writes for a session another instance hosts),
composed by ``composed.Database`` over a back-end (``postgres``, ``sqlite``). Nothing here imports ``bot`` or ``session_api``.
"""
