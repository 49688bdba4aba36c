"""gRPC load from h2load (Debian's nghttp2-client, C, one thread): the client costs little
CPU and shares no code with ours. Every call sends the same body: one gRPC length-prefixed
message (a unary call), or several (a client stream sent whole, then closed: AuthorizeStream
with 10 messages of 100 requests is one call). h2load counts HTTP 200 as success even when
grpc-status is not 0, so the answer is checked twice: once before, with nghttp (same package)
on the same request, for grpc-status 0 and the response's messages; and after every run, from
the bytes of DATA h2load received, which must be the expected response for each call (a gRPC
error carries no message)."""
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass


def install() -> None:
    """h2load and nghttp: installed from the OS packages when missing."""
    if shutil.which("h2load") and shutil.which("nghttp"):
        return
    print("h2load_grpc: installing nghttp2-client from the OS packages", file=sys.stderr,
          flush=True)
    for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q",
                                               "nghttp2-client"]):
        subprocess.run(args, check=True, stdout=sys.stderr)


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass
class Run:
    rate: float  # calls/s, h2load's "finished in ..., N req/s"
    calls: int
    p50: float  # ms, from h2load's per-request log
    p99: float
    client_cpu: float  # h2load's CPU time / wall time (1.0 = one core)
    server_cpu: float = 0.0  # the same of the server, when the caller measures it


class Call:
    """One method, its request message(s), sent as `authorization: Bearer <token>`."""

    def __init__(self, method: str, messages: list[bytes], token: str, workdir: str,
                 name: str = "body"):
        install()
        self.method = method
        self.body = os.path.join(workdir, f"{name}.bin")
        with open(self.body, "wb") as f:
            f.write(b"".join(map(frame, messages)))
        self.log = os.path.join(workdir, f"{name}-h2load.log")
        self.headers = ["-H", "content-type: application/grpc", "-H", "te: trailers",
                        "-H", f"authorization: Bearer {token}"]

    def url(self, address: str) -> str:
        return f"http://{address}{self.method}"

    def call(self, address: str) -> bytes:
        """One call with nghttp: the response's bytes (every gRPC frame of it, as sent),
        after checking grpc-status is 0."""
        args = ["nghttp", "-d", self.body, *self.headers, self.url(address)]
        verbose = subprocess.run([args[0], "-v", *args[1:]], capture_output=True, check=True,
                                 timeout=30).stdout
        status = re.findall(rb"grpc-status: (\d+)", verbose)
        if status != [b"0"]:
            message = re.findall(rb"grpc-message: (.*)", verbose)
            raise RuntimeError(f"{address}{self.method}: grpc-status {status} {message}")
        body = subprocess.run(args, capture_output=True, check=True, timeout=30).stdout
        at = 0
        while at < len(body):
            flag, length = struct.unpack(">BI", body[at:at + 5])
            if flag != 0 or at + 5 + length > len(body):
                raise RuntimeError(f"{address}{self.method}: not gRPC messages: {body!r}")
            at += 5 + length
        return body

    def command(self, address: str, seconds: float, connections: int, streams: int) -> list[str]:
        return ["h2load", "-D", f"{round(seconds * 1000)}ms", "-c", str(connections),
                "-m", str(streams), "-d", self.body, *self.headers, "--log-file", self.log,
                self.url(address)]

    def run(self, address: str, seconds: float, connections: int, streams: int,
            response: bytes) -> Run:
        """`response`: the bytes every call must be answered with (see `call`)."""
        if os.path.exists(self.log):
            os.remove(self.log)  # h2load appends to it
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        out = subprocess.run(self.command(address, seconds, connections, streams),
                             capture_output=True, text=True, timeout=seconds + 60)
        wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
        text = out.stdout
        finished = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
        counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                           r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
        data = re.search(r"\((\d+)\) data", text)
        if out.returncode != 0 or not (finished and counts and data):
            raise RuntimeError(f"h2load failed:\n{text}\n{out.stderr}")
        _, started, done, succeeded, failed, errored, timeouts = map(int, counts.groups())
        size = len(response)
        if not (done and succeeded == done and failed == errored == timeouts == 0
                and done * size <= int(data[1]) <= started * size):
            raise RuntimeError(f"h2load: not every call answered with the {size}-byte "
                               f"response (gRPC errors?):\n{text}")
        with open(self.log) as f:
            latencies = sorted(int(line.split("\t")[2]) / 1000 for line in f)
        return Run(float(finished[1]), done, latencies[len(latencies) // 2],
                   latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                   (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall)


def median_run(runs: list[Run]) -> Run:
    """The run with the median rate (its own latencies with it)."""
    rate = statistics.median_low(r.rate for r in runs)
    return next(r for r in runs if r.rate == rate)

