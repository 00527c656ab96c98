"""Pre-warming on other machines' GPUs through an RQ queue on Redis.

``protocol`` is what the coordinator (``cinecutd``) and the workers agree on: the queue's name, a job's
id and payload, the lease and heartbeat keys, and the connection. ``pathmap`` turns a coordinator's path
into this host's (refusing anything outside the mapped libraries); ``job`` is the function a worker runs
for one film; ``worker`` is ``cinecut worker --queue redis://...``. Nothing here imports ``rq`` or
``redis`` until it is used: without a queue configured, neither is needed.
"""
