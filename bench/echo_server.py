"""A bare grpc.aio server on uvloop with the same Authorization service: it answers every
Authorize with a fixed APPROVED at once (no identity, no validation, no store). It is the
ceiling our server is measured against: the cost of gRPC itself on this machine.

With --workers N, N processes each run it on the same port ("grpc.so_reuseport": the kernel
spreads connections over them), forked before any gRPC server or channel exists; the parent
only waits, says "echo: serving on" once every worker listens, and stops them on SIGTERM.

    .venv/bin/python bench/echo_server.py 127.0.0.1:50052 [--workers 2]
"""
import argparse
import os
import signal
import sys

import grpc
import uvloop

from yikatong.v1 import yikatong_pb2 as pb
from yikatong.v1 import yikatong_pb2_grpc as rpc


class Echo(rpc.AuthorizationServicer):
    async def Authorize(self, request, context):
        return pb.AuthorizeResponse(request_id=request.request_id, decision=pb.DECISION_APPROVED)

    async def AuthorizeStream(self, request_iterator, context):
        async for batch in request_iterator:
            out = pb.AuthorizeBatchResponse()
            for q in batch.requests:
                out.responses.add(request_id=q.request_id, decision=pb.DECISION_APPROVED)
            yield out


async def serve(address: str, ready_fd: int) -> None:
    server = grpc.aio.server(options=(("grpc.so_reuseport", 1),))
    rpc.add_AuthorizationServicer_to_server(Echo(), server)
    server.add_insecure_port(address)
    await server.start()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    await server.wait_for_termination()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("address")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = p.parse_args()
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            uvloop.run(serve(args.address, ready_w))
            os._exit(0)
        pids.append(pid)
    os.close(ready_w)

    def stop(*_):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = b""
    while len(ready) < args.workers and (byte := os.read(ready_r, 1)):
        ready += byte  # EOF first: a worker died before it listened
    if len(ready) == args.workers:
        print(f"echo: serving on {args.address} ({args.workers} workers, pids "
              f"{' '.join(map(str, pids))})", flush=True)
    else:
        stop()
    died = os.wait()  # the first worker to end (SIGTERM, or a crash) ends them all
    stop()
    for pid in pids:
        if pid != died[0]:
            os.waitpid(pid, 0)
    return 0 if len(ready) == args.workers else 1


if __name__ == "__main__":
    sys.exit(main())
