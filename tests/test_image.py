"""The container image as an operator runs it: `make image` builds it with no
image registry (mmdebstrap root filesystem, podman import, podman build), and
podman runs it read-only as a non-root user with a data volume: it serves
Search with a token from a podman secret, reports SERVING through gRPC health
(its HEALTHCHECK too), keeps its data across a restart, and stops cleanly on
SIGTERM.

The first run takes minutes (the root filesystem, the Python dependencies,
the native core and the model export); later runs reuse build/rootfs.tar,
the imported base image and podman's layer cache."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_grpc.client import RagClient
from rag_grpc.documents import Document
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/rag-grpc:pytest"
# server.grace_period_s (10 s) drains calls; podman then waits this long
# before SIGKILL, so a stop within it means the server ended on SIGTERM.
STOP_TIMEOUT_S = 30
# The same limits the machine's podman needs (FACTS: containers without a registry).
RUN_FLAGS = (
    "--runtime", "runc", "--network", "host",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
)  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run podman; fails the test with its output when check and it fails."""
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}{result.stdout}"
    return result


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built by `make image` (podman installed first when missing, as root)."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        pytest.fail(
            "podman is missing; as root run: apt-get install --no-install-recommends "
            "podman runc mmdebstrap (or run this test as root: `make image` installs them)"
        )
    started = time.monotonic()
    build = subprocess.run(
        ["make", "image", f"IMAGE={IMAGE}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert build.returncode == 0, (
        f"make image failed:\n{build.stdout[-4000:]}{build.stderr[-4000:]}"
    )
    print(f"make image: {time.monotonic() - started:.0f} s")
    yield IMAGE
    # The name goes; the base image and podman's layer cache (the image's
    # layers, now untagged) stay for the next build: `podman rmi` would take
    # the runtime stage's cached layers with it. `podman image prune` frees them.
    podman("untag", IMAGE, check=False)


@dataclass
class Container:
    """A named container of the image with its volume, token secret and port."""

    name: str
    volume: str
    secret: str
    token: str
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, image: str) -> None:
        podman(
            "run", "--detach", "--name", self.name, *RUN_FLAGS,
            "--read-only", "--volume", f"{self.volume}:/data",
            # The token from a podman secret, as an environment variable: a
            # secret mounted as a file needs its mount point in the image,
            # which --read-only keeps podman 4.3 from making.
            "--secret", f"{self.secret},type=env,target=RAG_GRPC_SERVER__AUTH_TOKEN",
            # Loopback: --network host shares the machine's interfaces.
            "--env", "RAG_GRPC_HOST=127.0.0.1",
            "--env", f"RAG_GRPC_PORT={self.port}",
            image,
        )  # fmt: skip

    def state(self) -> dict[str, object]:
        info = json.loads(podman("inspect", "--type", "container", self.name).stdout)[0]
        state = info["State"]
        assert isinstance(state, dict)
        return state

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state()["Status"] != "running":
                raise AssertionError(f"the container exited:\n{self.logs()[-4000:]}")
            if health(self.target) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.5)
        raise AssertionError(f"not SERVING after {timeout} s:\n{self.logs()[-4000:]}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


def health(target: str) -> int | None:
    """grpc.health.v1 status of the whole server, or None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    except grpc.RpcError:
        return None
    return int(reply.status)


@pytest.fixture
def container() -> Iterator[Container]:
    """Names for one test's container, volume and secret; all removed afterwards."""
    suffix = secrets.token_hex(4)
    token = secrets.token_hex(32)
    made = Container(
        f"rag-pytest-{suffix}", f"rag-pytest-{suffix}", f"rag-pytest-{suffix}", token, free_port()
    )
    podman("volume", "create", made.volume)
    created = subprocess.run(
        ["podman", "secret", "create", made.secret, "-"],
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    yield made
    made.remove()
    podman("volume", "rm", "--force", made.volume, check=False)
    podman("secret", "rm", made.secret, check=False)


def test_image_serves_read_only_as_non_root_and_stops_on_sigterm(
    image: str, container: Container
) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert "/opt/rag-grpc/healthcheck.py" in inspected["Healthcheck"]["Test"]

    container.run(image)
    container.wait_serving()
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    # The root filesystem is read-only; the volume is the server's to write.
    denied = podman("exec", container.name, "touch", "/opt/rag-grpc/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # The image's own HEALTHCHECK command (podman runs it on demand here).
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0

    document = Document(
        "kb-image", "The night ferry to the island leaves the harbour at eleven.", {"team": "ops"}
    )
    with RagClient(container.target, timeout=30, token=container.token) as client:
        client.upsert([document])
        hits = client.search("when does the ferry leave", k=3)
    assert hits and hits[0].document_id == "kb-image"

    started = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT_S), container.name, timeout=STOP_TIMEOUT_S + 60)
    stopped_in = time.monotonic() - started
    state = container.state()
    assert state["ExitCode"] == 0, container.logs()[-4000:]
    assert stopped_in < STOP_TIMEOUT_S, f"stop took {stopped_in:.1f} s: it needed SIGKILL"
    assert "rag-grpc stopped" in container.logs()

    # A new container on the same volume has the document (and reuses the
    # image's model export instead of writing one).
    container.remove()
    container.run(image)
    container.wait_serving()
    with RagClient(container.target, timeout=30, token=container.token) as client:
        hits = client.search("ferry to the island", k=3)
    assert hits and hits[0].document_id == "kb-image"
    listing = podman("exec", container.name, "ls", "/data").stdout.split()
    assert "rag.sqlite3" in listing and "models" not in listing
