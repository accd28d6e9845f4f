"""llmswap's own deployment: the Dockerfile built and run the way docker-compose.yml runs it.

No registry is reachable, so the build starts from a Debian bookworm image made with debootstrap
(`make docker-up`) instead of python:3.11-slim, and pip installs from wheels built here.  The
container then drives the host's engine through the mounted socket, exactly as in production.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.fakebackend import live_peers
from tests.support import HI, free_port
from tests.test_docker import ROOT, DockerTestCase, docker
from tests.test_twistd import get_json

pytestmark = pytest.mark.docker

BASE = "llmswap-test-python:bookworm"


def build_context(into: Path) -> None:
    """The repository's tracked files plus wheels of llmswap and its dependencies."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():
            (into / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name.decode())
    wheels = into / "wheels"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--wheel-dir", wheels, f"{into}[gguf,nvml]"], check=True, timeout=600
    )
    subprocess.run(
        [*pip, "download", "-d", wheels, "setuptools>=68", "wheel"], check=True, timeout=600
    )


def compose_run_args(compose: dict[str, Any], config: Path) -> list[str]:
    """`docker run` flags for the compose service, its config volume pointed at ``config``."""
    service = compose["services"]["llmswap"]
    args = ["--network", service["network_mode"], "--restart", service["restart"]]
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        if source == "./llmswap.yaml":
            source = str(config)
        args += ["-v", ":".join([source, target, *mode])]
    return args


class DeployTests(DockerTestCase):
    timeout = 900

    def test_image_runs_as_compose_runs_it_and_swaps_containers(self) -> None:
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        service = compose["services"]["llmswap"]
        self.assertEqual(service["network_mode"], "host")
        self.assertEqual(service["restart"], "unless-stopped")
        self.assertIn("/var/run/docker.sock:/var/run/docker.sock", service["volumes"])
        self.assertIn("./llmswap.yaml:/etc/llmswap/llmswap.yaml:ro", service["volumes"])

        context = Path(self.tmp) / "context"
        context.mkdir()
        build_context(context)
        image = f"llmswap-test-image:{uuid.uuid4().hex[:8]}"
        docker(
            "build", "--network", "host", "-q", "-t", image,
            "--build-arg", f"BASE={BASE}",
            "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /src/wheels",
            str(context),
        )  # fmt: skip
        self.addCleanup(docker, "rmi", "-f", image, check=False)

        port = free_port()
        models = {"alpha": self.create("alpha"), "beta": self.create("beta")}
        config = Path(self.tmp) / "llmswap.yaml"
        config.write_text(
            yaml.safe_dump({"listen": f"tcp:{port}:interface=127.0.0.1", "models": models})
        )
        name = f"{self.prefix}-llmswap"
        docker("run", "-d", "--name", name, *compose_run_args(compose, config), image)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(url + "/health")
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline, docker("logs", name).stderr)
                time.sleep(0.2)

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        for model in ("alpha", "beta"):
            r = client.chat.completions.create(model=model, messages=HI)
            self.assertEqual(r.choices[0].message.content, f"Hello from {model}")
        self.assertEqual(get_json(url + "/health")["current_model"], "beta")
        self.assertEqual(len(live_peers(self.ledger)), 1)
        self.assertEqual(self.state(models["alpha"]["container_name"]), "exited")

        docker("stop", "-t", "30", name)
        self.assertEqual(self.state(name), "exited")
        exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        self.assertIn(exit_code, ("0", "143"))  # twistd re-raises SIGTERM after a clean stop
        logs = docker("logs", name)
        output = logs.stdout + logs.stderr
        self.assertIn("model=beta key=- stream=False status=200", output)
        self.assertIn("swap alpha -> beta", output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)
