"""The engine: ``pykvm daemon`` and what it is made of, in the layers moby uses.

``routes`` (the REST API in the Docker Engine API's style, FastAPI) calls ``backend`` (the lifecycle
of VMs: create, start, stop, adopt after a restart, events, the memory budget), which keeps its
records in ``store`` (SQLite in WAL mode) and starts one ``shim`` process per running VM. The shim,
like containerd's, owns the VMM process, its console (rotated ``logs`` and an attach socket) and
writes the VMM's exit status where a restarted daemon finds it. ``access`` opens host paths with a
caller's permissions; ``server`` binds the Unix socket and serves; ``paths`` says where things live.
"""

MAX_STOP_WAIT = 3600    # seconds: the longest -t / ?t= that stop and restart wait before they kill
