"""Renders and checks the Kubernetes manifests under conf/kubernetes/, offline.

Run by tests/deploy.rs with the virtual environment's python (kubernetes-validate,
PyYAML), the pgrelay binary and the kustomization directories:

    python deploy.py PGRELAY_BIN DOCKERFILE_USER DIR...

For each directory it renders the kustomization (resources, and Secret/ConfigMap
generators without name hashes: all these manifests use; anything else is refused
rather than rendered wrong), compares the result with `kubectl kustomize` when kubectl
is installed, validates every object against the Kubernetes API schemas (strict: an
unknown field fails) of 1.30 and of the newest version the package carries, runs
`pgrelay check` on each pgrelay.toml the workloads mount, and checks what the schemas
cannot: names that refer to each other, probe and Service ports against the config's
listeners, selectors against pod labels, the drain budget, the security settings.
Prints "DIR: N objects ok" per directory; any failure raises (non-zero exit).
"""

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CONFIG_DIR = "/etc/pgrelay"
CONFIG_KEY = "pgrelay.toml"
KNOWN_KEYS = {"apiVersion", "kind", "resources", "secretGenerator",
              "configMapGenerator", "generatorOptions"}


def fail(where, why):
    raise SystemExit(f"{where}: {why}")


# ---------------------------------------------------------------- rendering


def render(directory):
    """The objects `kubectl kustomize DIRECTORY` gives, for the features used here."""
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        kustomization = yaml.safe_load(f)
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        fail(path, f"{sorted(unknown)} not rendered by tests/drivers/deploy.py; extend it")
    if kustomization.get("kind") != "Kustomization":
        fail(path, "kind is not Kustomization")
    objects = []
    for resource in kustomization.get("resources", []):
        target = os.path.join(directory, resource)
        if os.path.isdir(target):
            objects += render(target)
        else:
            with open(target) as f:
                objects += [o for o in yaml.safe_load_all(f) if o]
    generators = [("Secret", g) for g in kustomization.get("secretGenerator", [])]
    generators += [("ConfigMap", g) for g in kustomization.get("configMapGenerator", [])]
    options = kustomization.get("generatorOptions", {})
    if generators and options.get("disableNameSuffixHash") is not True:
        fail(path, "generated names carry a hash the renderer does not compute; "
             "set generatorOptions.disableNameSuffixHash: true or extend the renderer")
    for kind, generator in generators:
        objects.append(generated(directory, kind, generator))
    return objects


def generated(directory, kind, generator):
    unknown = set(generator) - {"name", "files", "literals", "type"}
    if unknown:
        fail(directory, f"{kind} generator keys {sorted(unknown)} not rendered")
    data = {}
    for entry in generator.get("files", []):
        key, _, file = entry.rpartition("=")
        with open(os.path.join(directory, file), "rb") as f:
            data[key or os.path.basename(file)] = f.read()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value.encode()
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
    if kind == "Secret":
        obj["type"] = generator.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v).decode() for k, v in data.items()}
    else:
        obj["data"] = {k: v.decode() for k, v in data.items()}
    return obj


def same_as_kubectl(directory, objects):
    """kubectl's own kustomize agrees with the renderer (skipped without kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(f"{directory}: kubectl not installed, rendering not compared with it")
        return
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if out.returncode != 0:
        fail(directory, f"kubectl kustomize: {out.stderr}")
    theirs = [o for o in yaml.safe_load_all(out.stdout) if o]
    if normalized(theirs) != normalized(objects):
        fail(directory, "the renderer and `kubectl kustomize` disagree")


def normalized(objects):
    """Sorted, with Secret data decoded (kustomize wraps long base64 lines)."""
    def plain(obj):
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
            obj = dict(obj, data=data)
        return obj
    return sorted((plain(o) for o in objects), key=name)


# ---------------------------------------------------------------- schemas


def validate_schemas(directory, objects):
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as e:  # the package's errors carry the path and message
                where = ".".join(str(p) for p in getattr(e, "path", []))
                message = getattr(e, "message", str(e))
                fail(directory, f"{name(obj)} against Kubernetes {version}: {where}: {message}")


# ---------------------------------------------------------------- cross-references


def name(obj):
    return f"{obj['kind']}/{obj['metadata']['name']}"


def seconds(duration):
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    if match is None:
        raise ValueError(f"duration {duration!r}")
    value, unit = int(match[1]), match[2]
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def pod_containers(pod):
    return pod.get("initContainers", []) + pod["containers"]


def port_number(container, port):
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    if len(numbers) != 1:
        fail(container["name"], f"no container port named {port!r}")
    return numbers[0]


def prestop_seconds(container):
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if command is None:
        return 0
    if command[0] != "sleep" or len(command) != 2:
        fail(container["name"], f"preStop {command} is not `sleep N`")
    return int(command[1])


def mounted_config(objects, deployment, pod, container, pgrelay, workdir):
    """The pgrelay.toml the container reads: the Secret or ConfigMap volume at
    /etc/pgrelay, which must exist among the objects and hold the key. Checked with
    `pgrelay check`; returns it parsed."""
    where = f"{name(deployment)}: container {container['name']}"
    if container.get("args") != ["run", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]:
        fail(where, f"args {container.get('args')} do not run {CONFIG_DIR}/{CONFIG_KEY}")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == CONFIG_DIR]
    if len(mounts) != 1 or "subPath" in mounts[0] or not mounts[0].get("readOnly"):
        fail(where, f"needs one read-only mount of the whole {CONFIG_DIR} (no subPath: "
             "a subPath mount never sees an edited Secret)")
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    if "secret" in volume:
        kind, ref = "Secret", volume["secret"]["secretName"]
    elif "configMap" in volume:
        kind, ref = "ConfigMap", volume["configMap"]["name"]
    else:
        fail(where, f"volume {volume['name']} is neither a Secret nor a ConfigMap")
    mode = volume[kind[0].lower() + kind[1:]].get("defaultMode", 0o644)
    group = pod.get("securityContext", {}).get("fsGroup")
    if not mode & 0o004 and not (mode & 0o040 and group is not None):
        fail(where, f"volume {volume['name']} (mode {mode:o}) is unreadable to pgrelay's "
             "user: make it world-readable or set the pod's fsGroup with a group read bit")
    source = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == ref]
    if not source or CONFIG_KEY not in source[0].get("data", {}):
        fail(where, f"mounts {kind} {ref}, which is not here or has no {CONFIG_KEY}")
    text = source[0]["data"][CONFIG_KEY]
    text = base64.b64decode(text).decode() if kind == "Secret" else text
    if kind == "ConfigMap" and re.search(r"(?m)^\s*password\s*=\s*\"[^\"]", text):
        fail(where, f"ConfigMap {ref} holds passwords; use a Secret")
    path = os.path.join(workdir, f"{ref}.toml")
    with open(path, "w") as f:
        f.write(text)
    out = subprocess.run([pgrelay, "check", "--config", path], capture_output=True, text=True)
    if out.returncode != 0:
        fail(where, f"pgrelay check refused {kind} {ref}: {out.stderr}")
    return tomllib.loads(text)


def check_probes(where, container, config):
    metrics = config.get("metrics_listen", "127.0.0.1:9930")
    host, _, port = metrics.rpartition(":")
    if host not in ("0.0.0.0", "[::]"):
        fail(where, f"metrics_listen {metrics} is not reachable by the kubelet's probes")
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = container.get(probe, {}).get("httpGet")
        if http is None or http["path"] != path:
            fail(where, f"{probe} is not an httpGet of {path}")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http = container.get(probe, {}).get("httpGet")
        if http and port_number(container, http["port"]) != int(port):
            fail(where, f"{probe} port is not metrics_listen's {port}")
    return int(port)


def check_security(where, pod, container, dockerfile_user):
    pod_security = pod.get("securityContext", {})
    security = container.get("securityContext", {})
    if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
        fail(where, "runAsNonRoot is not set")
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if user not in (None, dockerfile_user):
        fail(where, f"runAsUser {user} is not the image's user {dockerfile_user}")
    if security.get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        fail(where, "allowPrivilegeEscalation is not false")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        fail(where, "capabilities are not dropped (drop: [ALL])")
    for c in pod_containers(pod):
        resources = c.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
            fail(f"{where} / {c['name']}", "needs cpu and memory requests and a memory limit")


def check_listeners(where, pod, container, config):
    """Unix sockets are in a volume another container of the pod mounts too; TCP
    listeners on a pod address have a container port."""
    ports = {p["containerPort"] for p in container.get("ports", [])}
    tcp = []
    for listen in config.get("listen", ["127.0.0.1:6432"]):
        if listen.startswith("unix:"):
            directory = os.path.dirname(listen[len("unix:"):])
            volume = next((m["name"] for m in container.get("volumeMounts", [])
                           if m["mountPath"] == directory), None)
            if volume is None:
                fail(where, f"the socket directory {directory} is not a volume")
            sharing = [c for c in pod_containers(pod) if c is not container and any(
                m["name"] == volume and m["mountPath"] == directory
                for m in c.get("volumeMounts", []))]
            if not sharing:
                fail(where, f"no other container mounts {directory}")
            for c in sharing:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if env.get("PGHOST", directory) != directory:
                    fail(c["name"], f"PGHOST {env['PGHOST']} is not {directory}")
        else:
            host, _, port = listen.rpartition(":")
            if host not in ("127.0.0.1", "[::1]"):
                if int(port) not in ports:
                    fail(where, f"listen {listen} has no container port")
                tcp.append(int(port))
    return tcp


def check_drain(where, pod, config):
    shutdown = seconds(config.get("pool", {}).get("shutdown_timeout", "30s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    # A native sidecar stops after the main containers, whose preStop comes first.
    before = max(prestop_seconds(c) for c in pod_containers(pod))
    if grace <= before + shutdown:
        fail(where, f"terminationGracePeriodSeconds {grace} is not above preStop "
             f"{before}s + shutdown_timeout {shutdown}s")
    # /healthz keeps answering through the drain; the liveness probe's patience is still
    # kept above the drain, for a pgrelay too busy to answer while it drains.
    liveness = next(c for c in pod_containers(pod) if c["name"] == "pgrelay")["livenessProbe"]
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    if patience <= shutdown:
        fail(where, f"the liveness probe gives up after {patience}s, within "
             f"shutdown_timeout {shutdown}s")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_deployment(objects, deployment, pgrelay, dockerfile_user, workdir):
    template = deployment["spec"]["template"]
    pod = template["spec"]
    labels = template["metadata"]["labels"]
    if not matches(deployment["spec"]["selector"]["matchLabels"], labels):
        fail(name(deployment), "selector does not match the pod template's labels")
    relays = [c for c in pod_containers(pod) if c["name"] == "pgrelay"]
    if len(relays) != 1:
        fail(name(deployment), "needs one container named pgrelay")
    container = relays[0]
    where = f"{name(deployment)}: container pgrelay"
    sidecar = container in pod.get("initContainers", [])
    if sidecar and container.get("restartPolicy") != "Always":
        fail(where, "an init container that is not a native sidecar (restartPolicy: Always)")
    config = mounted_config(objects, deployment, pod, container, pgrelay, workdir)
    metrics_port = check_probes(where, container, config)
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or \
            annotations.get("prometheus.io/port") != str(metrics_port):
        fail(where, f"prometheus.io annotations do not name port {metrics_port}")
    check_security(where, pod, container, dockerfile_user)
    tcp_ports = check_listeners(where, pod, container, config)
    check_drain(where, pod, config)
    return labels, container, tcp_ports, metrics_port


def check_services(objects, deployments):
    """Every Service and PodDisruptionBudget selects the pods of exactly one Deployment;
    a Service's target ports are that pod's pgrelay ports."""
    for service in of_kind(objects, "Service"):
        selected = [d for d in deployments if matches(service["spec"]["selector"], d[1])]
        if len(selected) != 1:
            fail(name(service), "does not select the pods of exactly one Deployment")
        deployment, _, container, tcp_ports, metrics_port = selected[0]
        targets = {port_number(container, p.get("targetPort", p["port"]))
                   for p in service["spec"]["ports"]}
        if targets != set(tcp_ports) | {metrics_port}:
            fail(name(service), f"target ports {sorted(targets)} are not pgrelay's "
                 f"listeners {tcp_ports} and metrics port {metrics_port}")
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selected = [d for d in deployments
                    if matches(pdb["spec"]["selector"]["matchLabels"], d[1])]
        if len(selected) != 1:
            fail(name(pdb), "does not select the pods of exactly one Deployment")
        replicas = selected[0][0]["spec"].get("replicas", 1)
        if replicas < 2:
            fail(name(pdb), f"guards a Deployment of {replicas} replica(s)")


def check_directory(directory, pgrelay, dockerfile_user):
    objects = render(directory)
    same_as_kubectl(directory, objects)
    validate_schemas(directory, objects)
    names = [name(o) for o in objects]
    if len(set(names)) != len(names):
        fail(directory, f"duplicate objects: {names}")
    deployments = []
    with tempfile.TemporaryDirectory() as workdir:
        for deployment in of_kind(objects, "Deployment"):
            labels, container, tcp, metrics = check_deployment(
                objects, deployment, pgrelay, dockerfile_user, workdir)
            deployments.append((deployment, labels, container, tcp, metrics))
    if not deployments:
        fail(directory, "no Deployment runs pgrelay")
    check_services(objects, deployments)
    print(f"{directory}: {len(objects)} objects ok "
          f"(Kubernetes {', '.join(KUBERNETES_VERSIONS)})")


def main():
    pgrelay, dockerfile_user, *directories = sys.argv[1:]
    if not directories:
        raise SystemExit("usage: deploy.py PGRELAY_BIN DOCKERFILE_USER DIR...")
    for directory in directories:
        check_directory(directory, pgrelay, int(dockerfile_user))


if __name__ == "__main__":
    main()
