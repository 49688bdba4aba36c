"""The gRPC server (grpc.aio on uvloop): edge validation, identity, and the servicers that
call the domain (yikatong/), the fast path (fastpath/) and the store (storage/)."""
