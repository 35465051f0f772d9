"""The two container images: their Dockerfile rules, and real builds run read-only as uid 10001.

Nothing can be pulled from a container registry here, so the build tests make a local base
image with debootstrap (Debian bookworm, python3) and pass it as the BASE_IMAGE build argument.
The builds still install the Python packages from PyPI. The train image gets a CPU build of torch
(a local wheel, TORCH_SPEC) instead of the default CUDA build; everything else is the real
Dockerfile. Needs root, buildah, podman, runc and debootstrap (apt-get install buildah podman
runc debootstrap uidmap).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"extract": ROOT / "images/extract/Dockerfile", "train": ROOT / "images/train/Dockerfile"}
UID = "10001"
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"  # the images make their own venv: no python3-pip
# The host's CA bundle goes into the test base, so a TLS-intercepting proxy in front of PyPI works.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE_DIR = Path(os.environ.get("SAIGE_IMAGE_CACHE", "/var/tmp/saige-image-test"))
# What podman needs on these machines, plus a pod's restrictions.
RUN_FLAGS = [
    "--rm",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
    "--network",
    "none",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]
READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]


# ---------------------------------------------------------------- static rules (no tools needed)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in logical]


def pip_installs(steps: list[tuple[str, str]]) -> list[str]:
    return [part.strip() for op, args in steps if op == "RUN" for part in args.split("&&") if "pip install" in part]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_rules(name):
    steps = instructions(DOCKERFILES[name])
    ops = [op for op, _ in steps]
    text = DOCKERFILES[name].read_text()

    # A BASE_IMAGE build argument, declared before FROM, defaulting to a digest-pinned image.
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE="), steps[0]
    assert re.fullmatch(r"BASE_IMAGE=\S+:\S+@sha256:[0-9a-f]{64}", steps[0][1]), steps[0][1]
    assert [args for op, args in steps if op == "FROM"] == ["${BASE_IMAGE}"]

    # Numeric, non-root user, set once, before the entrypoint.
    users = [args for op, args in steps if op == "USER"]
    assert users == [f"{UID}:{UID}"]
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    assert dict(steps)["ENTRYPOINT"] == '["saige-k8s"]'

    # No whole-context copy; only what the image needs.
    copies = [args for op, args in steps if op in {"COPY", "ADD"}]
    assert ops.count("ADD") == 0
    for args in copies:
        sources = args.split()[:-1]
        assert "." not in sources and "./" not in sources, args
    assert ".venv" not in text and "tests/" not in text

    # Every pip install skips the cache; dependencies are installed before the source is copied.
    installs = pip_installs(steps)
    assert installs and all("--no-cache-dir" in cmd for cmd in installs), installs
    copy_source = next(i for i, (op, args) in enumerate(steps) if op == "COPY" and args.startswith("saige_k8s "))
    deps_step = next(i for i, (op, args) in enumerate(steps) if op == "RUN" and "/src[" in args)
    assert deps_step < copy_source
    assert "pip install" in steps[copy_source + 1][1] and "--no-deps" in steps[copy_source + 1][1]
    assert all("-c /src/constraints.txt" in cmd for cmd in installs if "--no-deps" not in cmd), installs
    assert re.search(r"^ARG PIP_VERSION=\d+(\.\d+)+$", text, re.MULTILINE)

    env = " ".join(args for op, args in steps if op == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp"):
        assert setting in env
    labels = " ".join(args for op, args in steps if op == "LABEL")
    for key in ("title", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels

    if name == "extract":
        instructions_text = " ".join(f"{op} {args}" for op, args in steps)
        assert "torch" not in instructions_text.lower() and "[train" not in instructions_text
        assert '"/src[extract,k8s]"' in text
    else:
        assert re.search(r"^ARG TORCH_SPEC=torch==\d+\.\d+\.\d+$", text, re.MULTILINE)
        assert '"/src[train,k8s]"' in text


def test_constraints_pin_exact_versions_and_leave_torch_to_the_train_dockerfile():
    lines = [ln for ln in (ROOT / "images/constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines
    names = []
    for line in lines:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*", line), line
        names.append(line.split("==")[0])
    assert len(names) == len(set(names))
    assert not {"torch", "saige-k8s", "pip"} & set(names)
    assert {"pyarrow", "sqlalchemy", "kubernetes", "transformers", "peft", "bitsandbytes", "hatchling"} <= set(names)


def test_dockerignore_keeps_the_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "*.db", "saige-data", "dist", "build", "**/__pycache__"} <= ignored


# ---------------------------------------------------------------- real builds and runs


def sh(*cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        pytest.fail(f"`{' '.join(cmd[:4])} …` exited {proc.returncode}:\n{tail}", pytrace=False)
    return proc


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), else deb.debian.org."""
    if os.environ.get("SAIGE_DEBIAN_MIRROR"):
        return os.environ["SAIGE_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        for uri in re.findall(r"^(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+)", path.read_text(), re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def base_image() -> str:
    """A Debian bookworm base with python3, made by debootstrap and imported into podman (cached)."""
    for tool in ("buildah", "podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            need_tool(f"{tool} not found; apt-get install buildah podman runc debootstrap uidmap")
    if os.geteuid() != 0:
        need_tool("the image tests run as root (debootstrap, podman's default storage)")
    mirror = debian_mirror()
    ca = HOST_CA.read_bytes() if HOST_CA.exists() else b""
    key = hashlib.sha256(f"{DEBIAN_SUITE}|{BASE_PACKAGES}|{mirror}".encode() + ca).hexdigest()[:12]
    tag = f"localhost/saige-test-base:{DEBIAN_SUITE}-{key}"
    if sh("podman", "image", "exists", tag, check=False).returncode == 0:
        return tag
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE_DIR / f"rootfs-{key}-{uuid.uuid4().hex[:6]}"
    try:
        sh(
            "debootstrap",
            "--variant=minbase",
            f"--include={BASE_PACKAGES}",
            DEBIAN_SUITE,
            str(rootfs),
            mirror,
        )
        if ca:
            (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                "podman",
                "import",
                "--change",
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "--change",
                "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                "-",
                tag,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            pytest.fail(f"podman import of the debootstrap base failed: {imported.stderr.strip()}", pytrace=False)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


def build(name: str, base: str, *extra: str) -> str:
    tag = f"localhost/saige-k8s-{name}:test-{uuid.uuid4().hex[:8]}"
    sh(
        "buildah",
        "bud",
        "--isolation",
        "oci",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=4096:4096",
        "--build-arg",
        f"BASE_IMAGE={base}",
        *extra,
        "-f",
        str(DOCKERFILES[name]),
        "-t",
        tag,
        str(ROOT),
    )
    return tag


@pytest.fixture(scope="module")
def extract_image(base_image: str) -> Iterator[str]:
    tag = build("extract", base_image)
    yield tag
    sh("podman", "rmi", "-f", tag, check=False)


def cpu_torch_wheel(target: Path) -> Path:
    """The CPU build of the torch version the train Dockerfile pins, from this machine's pip sources."""
    spec = re.search(r"^ARG TORCH_SPEC=(\S+)$", DOCKERFILES["train"].read_text(), re.MULTILINE).group(1)
    proc = sh(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_28_x86_64",
        "-d",
        str(target),
        spec,
        check=False,
    )
    wheels = list(target.glob("torch-*+cpu-*.whl"))
    if proc.returncode != 0 or not wheels:
        need_tool(f"no CPU wheel of {spec} in this machine's pip sources (the CUDA build is several GB)")
    return wheels[0]


@pytest.fixture(scope="module")
def train_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    wheel = cpu_torch_wheel(tmp_path_factory.mktemp("wheels"))
    tag = build(
        "train",
        base_image,
        "--volume",
        f"{wheel.parent}:/wheels:ro",
        "--build-arg",
        f"TORCH_SPEC=/wheels/{wheel.name}",
    )
    yield tag
    sh("podman", "rmi", "-f", tag, check=False)


def volume(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # the container's uid 10001 writes here, as on a PVC with fsGroup
    return data


def run(image: str, data: Path, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    flags = [*RUN_FLAGS, *READ_ONLY, "-v", f"{data}:/data"]
    if entrypoint:
        flags += ["--entrypoint", entrypoint]
    return sh("podman", "run", *flags, image, *args, check=False, timeout=300)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    return proc.stdout


def demo_dataset(image: str, data: Path, rows: int) -> dict:
    """`saige-k8s demo-db` then `saige-k8s extract --json` in the extract image; the JSON summary."""
    ok(run(image, data, "demo-db", "--db", "/data/demo.db", "--rows", str(rows)))
    return json.loads(ok(run(image, data, "extract", "--db", "/data/demo.db", "--data-root", "/data", "--json")))


@pytest.mark.slow
@pytest.mark.image
def test_extract_image_builds_a_dataset_read_only_as_uid_10001(extract_image, tmp_path):
    import pyarrow.parquet as pq

    data = volume(tmp_path)
    summary = demo_dataset(extract_image, data, rows=500)

    dataset = data / "datasets" / summary["dataset_id"]
    assert (data / "datasets/LATEST").read_text().strip() == summary["dataset_id"]
    manifest = json.loads((dataset / "manifest.json").read_text())
    train = pq.read_table(dataset / "train.parquet")
    evals = pq.read_table(dataset / "eval.parquet") if (dataset / "eval.parquet").exists() else None
    rows = train.num_rows + (evals.num_rows if evals is not None else 0)
    assert summary["kept"] > 0 and rows == summary["kept"]
    assert train.num_rows == summary["train"]
    assert manifest["dataset_id"] == summary["dataset_id"]
    assert manifest["counts"]["kept"] == summary["kept"] and manifest["counts"]["scanned"] == 500
    # Written by the image's user, not root, on the host side of the volume.
    assert {p.stat().st_uid for p in dataset.iterdir()} == {int(UID)}
    assert ok(run(extract_image, data, "-u", entrypoint="id")).strip() == UID


@pytest.mark.slow
@pytest.mark.image
def test_extract_image_has_no_torch_and_runs_the_controller_cli(extract_image, tmp_path):
    data = volume(tmp_path)
    proc = run(extract_image, data, "-c", "import torch", entrypoint="python3")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    ok(run(extract_image, data, "-c", "import kubernetes, pyarrow, sqlalchemy, saige_k8s.cli", entrypoint="python3"))
    assert "extract" in ok(run(extract_image, data))  # the default command is --help

    config = json.loads(ok(sh("podman", "image", "inspect", extract_image)))[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["saige-k8s"]
    assert config["WorkingDir"] == "/data"
    assert config["Labels"]["org.opencontainers.image.title"] == "saige-k8s-extract"


@pytest.mark.slow
@pytest.mark.image
def test_train_image_trains_an_adapter_read_only(extract_image, train_image, tmp_path):
    import pyarrow.parquet as pq

    from tests.tiny_model import build_tiny_model

    data = volume(tmp_path)
    summary = demo_dataset(extract_image, data, rows=400)
    texts = pq.read_table(data / "datasets" / summary["dataset_id"] / "train.parquet").column("text").to_pylist()
    model = build_tiny_model(data / "model", texts)
    for path in [model, *model.iterdir()]:
        path.chmod(path.stat().st_mode | 0o005)

    proc = run(
        train_image,
        data,
        "train",
        "--data-root",
        "/data",
        "--model",
        "/data/model",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-seq-len",
        "128",
        "--output-dir",
        "/data/runs/image-test",
    )
    ok(proc)
    run_dir = data / "runs/image-test"
    assert (run_dir / "adapter/adapter_model.safetensors").stat().st_size > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset_id"] == summary["dataset_id"]
    assert (run_dir / "metrics.json").stat().st_uid == int(UID)
    versions = ok(run(train_image, data, "-c", "import torch, peft; print(torch.__version__)", entrypoint="python3"))
    assert versions.strip().startswith("2.")
