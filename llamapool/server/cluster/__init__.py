"""Several servers, one pool: membership through Valkey/Redis and requests that cross to the
server a worker is connected to.

- :mod:`.membership`: what each server publishes of its workers and mirrors of the others';
- :mod:`.peer` and :mod:`.endpoint`: how a request for another server's worker crosses;
- :mod:`.usage`: client keys' limits and the queue bounds held over the servers;
- :mod:`.auth`: what the servers prove to each other with ``CLUSTER_KEY``.

Without ``CLUSTER_URL`` none of it runs and no Redis is needed.
"""
