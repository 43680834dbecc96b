"""One VM's API socket: Firecracker's REST API over HTTP/1.1 on a Unix socket.

``models`` declares the request bodies (unknown fields and wrong types are refused by validation),
``controller`` owns the VM and applies typed actions one at a time, ``server`` maps routes to actions and
serves them with uvicorn on a 0600 Unix socket. The web stack is imported only when an API socket is asked for.
"""
