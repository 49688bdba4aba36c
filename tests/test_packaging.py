"""One installable namespace: the sdist carries proto/ and the Cython source, a wheel builds
from it on its own, and that wheel installed into a fresh venv serves the demo."""
import os
import subprocess
import sys
import tarfile
import zipfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yikatong.server.harness import ROOT, free_address, wait_until


def run(args, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_the_sdist_builds_a_wheel_that_installs_into_a_fresh_venv_and_serves_the_demo(tmp_path):
    dist = tmp_path / "dist"
    # Without build isolation: the build requirements are pinned in pyproject.toml and
    # installed in the test venv from constraints.txt, so this needs no network.
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist),
         ROOT])
    (sdist,) = dist.glob("yikatong-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert "proto/yikatong/v1/yikatong.proto" in names
    assert "fastpath/_authorize_c.pyx" in names and "setup.py" in names
    assert not [n for n in names if "_pb2" in n or n.endswith((".so", ".c"))], \
        "generated files belong to the build, not the sdist"

    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(dist), str(sdist)], cwd=tmp_path)
    (wheel,) = dist.glob("yikatong-*.whl")
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
    for module in ("yikatong/server/app.py", "yikatong/server/services/ledger.py",
                   "yikatong/storage/lmdb_store.py",
                   "yikatong/v1/yikatong_pb2.py", "yikatong/v1/yikatong_pb2_grpc.py"):
        assert module in files, module
    assert any(f.startswith("yikatong/fastpath/_authorize_c") and f.endswith(".so")
               for f in files)
    assert not [f for f in files if f.split("/")[0] in ("server", "storage", "fastpath")], \
        "no top-level package but yikatong"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "-q", "-c", os.path.join(ROOT, "constraints.txt"),
         str(wheel)], cwd=tmp_path)
    address = free_address()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # from an empty directory, far from the checkout: only the installed wheel is used
        proc = subprocess.Popen(
            [str(venv / "bin" / "yikatong"), "serve", "--demo", "--data-dir",
             str(tmp_path / "data"), "--listen", address],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            | {"YIKATONG_REQUIRE_EXTENSIONS": "1"})
    try:
        assert wait_until(lambda: "CARD_NOT_FOUND" in log.read_text()
                          or proc.poll() is not None, timeout=120)
        banner = log.read_text()
        assert proc.poll() is None, banner
        assert str(venv) in run([str(venv / "bin" / "python"), "-c",
                                 "import yikatong.fastpath as f; assert f.COMPILED; "
                                 "print(f.impl.__file__)"], cwd=tmp_path).stdout
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="yikatong.v1.Authorization"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        lines = [line.strip() for line in banner.splitlines()]
        i = next(i for i, line in enumerate(lines) if "yikatong authorize" in line)
        answer = subprocess.run([str(venv / "bin" / "yikatong"), *lines[i].split()[1:]],
                                cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert "-> " + answer.stdout.strip() == lines[i + 1], answer.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
