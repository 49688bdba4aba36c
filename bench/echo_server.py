"""A bare grpc.aio server on uvloop with the same Authorization service: it answers every
Authorize with a fixed APPROVED at once (no identity, no validation, no store). It is the
ceiling our server is measured against: the cost of gRPC itself on this machine.

    .venv/bin/python bench/echo_server.py 127.0.0.1:50052
"""
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


async def main(address: str) -> None:
    server = grpc.aio.server()
    rpc.add_AuthorizationServicer_to_server(Echo(), server)
    server.add_insecure_port(address)
    await server.start()
    print(f"echo: serving on {address}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
