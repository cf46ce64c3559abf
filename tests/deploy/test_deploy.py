"""The deployment files under deploy/, checked statically: no container daemon or cluster is needed.

The manifests are validated against the Kubernetes API schemas, the server.toml they carry is read
by the server's own config loader, and every port, probe, path and Secret they name is checked
against it; the Dockerfiles' install commands are the README's.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NOT_APPLIED = {"secrets.example.yaml", "prometheus-adapter-rule.yaml", "kustomization.yaml"}


def _docs(name):
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name, kind):
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def deployment():
    return _one("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def pod(deployment):
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def server(pod):
    (c,) = [c for c in pod["containers"] if c["name"] == "server"]
    return c


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The server.toml of the shallowmark-config Secret, read by the server's loader."""
    from shallowmark.server.config import load_config

    secret = [d for d in _docs("secrets.example.yaml") if d["metadata"]["name"] == "shallowmark-config"][0]
    path = tmp_path_factory.mktemp("cfg") / "server.toml"
    path.write_text(secret["stringData"]["server.toml"])
    return load_config(path)


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _port(container, name):
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return p


def _secret_keys():
    """Secret name -> keys, from the example Secrets and the `kubectl create secret` lines beside them."""
    keys = {d["metadata"]["name"]: set(d["stringData"]) for d in _docs("secrets.example.yaml") if d["kind"] == "Secret"}
    for line in (K8S / "secrets.example.yaml").read_text().splitlines():
        if "kubectl create secret" in line:
            words = shlex.split(line.lstrip("# "))
            name = words[4]
            for w in words:
                m = re.match(r"--from-(?:file|literal)=([^=]+)(=|$)", w)
                if m:
                    keys.setdefault(name, set()).add(PurePosixPath(m.group(1)).name)
    return keys


def _source(pod, container, path):
    """(volume, key inside it) that a file path in ``container`` comes from."""
    path = PurePosixPath(path)
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of {container['name']}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    (vol,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
    rel = str(path.relative_to(m["mountPath"]))
    if "secret" in vol:
        items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
        if items:
            assert rel in items, f"{path}: {rel} is not among the items of Secret {vol['secret']['secretName']}"
            rel = items[rel]
    return vol, rel


def _secret_file(pod, container, path):
    vol, key = _source(pod, container, path)
    assert "secret" in vol, f"{path} does not come from a Secret"
    name = vol["secret"]["secretName"]
    assert key in _secret_keys().get(name, ()), f"{path}: Secret {name} is not made with the key {key}"
    return name


# -- the manifests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.30.0", "latest"])
def test_every_manifest_is_valid_for_the_kubernetes_api(version):
    kv = pytest.importorskip("kubernetes_validate", reason="the dev extra installs kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    checked = 0
    for f in sorted(K8S.glob("*.yaml")):
        for doc in _docs(f.name):
            if doc["kind"] != "Kustomization":
                kv.validate(doc, version, strict=True)   # strict: an unknown (misspelt) field fails
                checked += 1
    assert checked >= 8


def test_the_kustomization_applies_every_manifest_but_the_examples():
    kust = _one("kustomization.yaml", "Kustomization")
    assert sorted(kust["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name not in NOT_APPLIED)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_builds_the_kustomization():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]


def test_ports_are_the_configs_and_the_services_target_them(config, deployment, server):
    from shallowmark.server.metrics import METRICS_PATH

    assert _port(server, "grpc") == config.port == 50051
    assert _port(server, "metrics") == config.metrics_port
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0"   # reachable from outside the pod
    services = {s["metadata"]["name"]: s for s in _docs("service.yaml")}
    (grpc_port,) = services["shallowmark"]["spec"]["ports"]
    assert grpc_port["port"] == config.port and grpc_port["targetPort"] == "grpc"
    (metrics_port,) = services["shallowmark-metrics"]["spec"]["ports"]   # not on the clients' Service
    assert metrics_port["port"] == config.metrics_port and metrics_port["targetPort"] == "metrics"
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == config.metrics_port and notes["prometheus.io/path"] == METRICS_PATH


def test_selectors_of_the_services_and_the_pdb_match_the_pods(deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    for svc in _docs("service.yaml"):
        assert svc["spec"]["selector"] == selector
    pdb = _one("pdb.yaml", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"] and deployment["spec"]["replicas"] > 1


def test_probes_check_grpc_health_with_the_servers_own_config(config, server, healthcheck):
    from shallowmark.server.app import SERVICE_NAME

    config_path = server["args"][server["args"].index("--config") + 1]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = server[kind]["exec"]["command"]
        assert cmd[:2] == ["python", "/opt/shallowmark/healthcheck.py"]
        a = healthcheck.parser().parse_args(cmd[2:])
        assert a.config == config_path   # so its port and TLS are the server's
        assert a.ca and PurePosixPath(a.ca).parent == PurePosixPath(config.tls.cert).parent   # the tls Secret
        assert a.alive == (kind == "livenessProbe")
        assert a.server_name in {s["metadata"]["name"] for s in _docs("service.yaml")}   # what clients dial
        if kind != "livenessProbe":   # SERVING for the Watermark service: models loaded, ledger sound
            assert a.service == SERVICE_NAME
    assert server["startupProbe"]["periodSeconds"] * server["startupProbe"]["failureThreshold"] >= 120


def test_config_tls_keys_and_ledger_come_from_secrets(config, pod, server, healthcheck):
    config_path = server["args"][server["args"].index("--config") + 1]
    assert _secret_file(pod, server, config_path) == "shallowmark-config"
    assert config.tls is not None and config.tls.client_ca is None and not config.allow_insecure
    probe_ca = healthcheck.parser().parse_args(server["readinessProbe"]["exec"]["command"][2:]).ca
    tls = {_secret_file(pod, server, p) for p in (config.tls.cert, config.tls.key, probe_ca)}
    assert tls == {"shallowmark-tls"}
    # the PostgreSQL password from a Secret, never in the URL; the database's CA mounted from one
    from psycopg.conninfo import conninfo_to_dict

    url = conninfo_to_dict(config.resolved_ledger_url())
    assert "password" not in url and url["sslmode"] == "verify-full"
    assert _secret_file(pod, server, url["sslrootcert"]) == "shallowmark-postgres"
    env = {e["name"]: e for e in server["env"]}
    ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret_keys()[ref["name"]]


def test_the_attestation_key_is_one_secret_copied_private_and_the_head_file_is_per_pod(config, pod, server):
    (init,) = pod["initContainers"]
    assert init["image"] == server["image"]
    cmd = init["command"]
    assert cmd[:3] == ["install", "-m", "0600"]
    src, dst = cmd[3:]
    assert _secret_file(pod, init, src) == "shallowmark-attestation"
    assert dst == str(config.resolved_attestation_key())
    state_init, _ = _source(pod, init, dst)
    state, _ = _source(pod, server, dst)
    assert state is state_init and "emptyDir" in state    # the pod's own folder, shared by the two containers
    head, _ = _source(pod, server, config.resolved_ledger_head_file())
    assert head is state          # one head file per replica (docs/service.md: never share it)


def test_the_pod_runs_as_the_images_non_root_user_on_a_gpu(config, pod, server):
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == _image_uid("Dockerfile.cuda") != 0
    assert server["securityContext"]["readOnlyRootFilesystem"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and config.device == "cuda"
    assert server["image"].endswith(":cuda")


def test_termination_waits_for_the_drain(config, pod, server):
    from shallowmark.server.app import STOP_SLACK_S

    pause = float(server["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= config.grace_s + STOP_SLACK_S + pause


def test_the_hpa_scales_the_deployment_on_the_servers_request_counter(deployment):
    from prometheus_client import generate_latest

    from shallowmark.server.app import SERVICE_NAME
    from shallowmark.server.config import ServerConfig
    from shallowmark.server.metrics import Metrics

    hpa = _one("hpa.yaml", "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(_one("prometheus-adapter-rule.yaml", "ConfigMap")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    series = re.match(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series.group(1))
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == renamed
    # the series exists, with that label, in what the server exposes
    text = generate_latest(Metrics(ServerConfig()).registry).decode()
    assert re.search(rf'^{series.group(1)}\{{[^}}]*grpc_service="{re.escape(SERVICE_NAME)}"', text, re.M)
    assert f'grpc_service="{SERVICE_NAME}"' in series.group(2) and f'grpc_service="{SERVICE_NAME}"' in \
        rule["metricsQuery"]


# -- the images ------------------------------------------------------------------------------------


def _instructions(name):
    """(KEYWORD, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in (DEPLOY / name).read_text().splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\") and cur:
            word, _, rest = cur.partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def _image_uid(name):
    (user,) = [a for k, a in _instructions(name) if k == "USER"]
    assert user.isdigit(), "USER must be numeric for runAsNonRoot"
    return int(user)


def _readme_installs():
    """Dockerfile -> the pip commands the README's Deployment section gives for it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    out, current = {}, None
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            m = re.match(r"# (deploy/Dockerfile\.\w+)$", line)
            if m:
                current = out.setdefault(m.group(1), [])
            elif line.startswith("pip install") and current is not None:
                current.append(line)
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_the_images_install_with_the_readmes_commands(name):
    runs = [a for k, a in _instructions(name) if k == "RUN" and a.startswith("pip install")]
    assert runs == _readme_installs()[f"deploy/{name}"]
    assert runs[0].startswith("pip install torch==2.13.0") and runs[-1].startswith("pip install '.[server")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_the_images_are_multi_stage_non_root_and_check_grpc_health(name, config, healthcheck):
    ins = _instructions(name)
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS build") and " AS " not in froms[-1]
    assert any(k == "COPY" and a.startswith("--from=build /opt/venv") for k, a in ins)
    assert _image_uid(name) != 0
    (hc,) = [a for k, a in ins if k == "HEALTHCHECK"]
    cmd = json.loads(hc.split(" CMD ", 1)[1])
    assert cmd[:2] == ["python", "/opt/shallowmark/healthcheck.py"]
    assert any(k == "COPY" and a == "deploy/healthcheck.py /opt/shallowmark/healthcheck.py" for k, a in ins)
    a = healthcheck.parser().parse_args(cmd[2:])
    (served,) = [json.loads(a) for k, a in ins if k == "CMD"]
    assert a.config == served[served.index("--config") + 1] and a.service == "shallowmark.v1.Watermark"
    (entry,) = [a for k, a in ins if k == "ENTRYPOINT"]
    assert json.loads(entry) == ["shallowmark", "serve"]
    (exposed,) = [a.split() for k, a in ins if k == "EXPOSE"]
    assert exposed == [str(config.port), str(config.metrics_port)]


def test_the_cuda_image_is_the_cpu_image_with_another_torch():
    cpu, cuda = _instructions("Dockerfile.cpu"), _instructions("Dockerfile.cuda")
    only_cpu = [i for i in cpu if i not in cuda]
    only_cuda = [i for i in cuda if i not in cpu]
    assert only_cpu == [("RUN", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")]
    assert only_cuda == [("RUN", "pip install torch==2.13.0"), ("ENV", "NVIDIA_DRIVER_CAPABILITIES=compute,utility")]


def test_the_build_stage_copies_every_package_folder_and_the_model_ships_in_the_package():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {src for k, a in _instructions("Dockerfile.cpu") if k == "COPY" and not a.startswith("--")
              for src in a.split()[:-1]}
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders | {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    # "the model baked in": tiny-ldm's config and weights are package data of the wheel the image installs
    patterns = pyproject["tool"]["setuptools"]["package-data"]["shallowmark.core.assets"]
    assets = ROOT / "core" / "assets"
    shipped = {Path(p) for pat in patterns for p in glob.glob(str(assets / pat))}
    needed = {p for p in (assets / "tiny-ldm").rglob("*") if p.suffix in (".json", ".safetensors")}
    assert any(p.suffix == ".safetensors" for p in needed) and needed <= shipped


# -- the README ------------------------------------------------------------------------------------


def test_the_readmes_deployment_section_links_and_files_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", section)
    paths = set(re.findall(r"`(deploy/[\w./-]+)`", section))
    assert len(links) >= 4 and paths
    for p in set(links) | paths:
        assert (ROOT / p).exists(), p
    assert set(_readme_installs()) == {"deploy/Dockerfile.cpu", "deploy/Dockerfile.cuda"}
