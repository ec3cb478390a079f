"""deploy/ cannot drift from the code: every ``swarmrt ...`` command that a file under deploy/
runs (compose and Kubernetes command/args, shell strings, SkyPilot run/setup, the Dockerfile's
ENTRYPOINT/CMD/RUN, the README's shell blocks) must parse with the current CLI's
``build_parser()``; the run configs must load; Kubernetes basics hold (resource requests,
termination grace >= the peers' drain grace, spot scheduling, the bootstrap Service).

Docker and Kubernetes are not available here, so the files are parsed, not run.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from swarmrt.cli import build_parser
from swarmrt.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DUMMY = "1"  # stands for every $VAR: valid as a path, a multiaddr, an int and a float
SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)
MENTION = re.compile(r"(?<![\w./:-])swarmrt\s+(?:" + "|".join(map(re.escape, SUBCOMMANDS)) + r"|--help|-h)(?![\w-])")
EXPECTED_FILES = {"Dockerfile", "README.md", "compose.yaml", "join.sh", "run.toml", "skypilot.yaml",
                  "k8s/kustomization.yaml", "k8s/namespace.yaml", "k8s/configmap.yaml", "k8s/storage.yaml",
                  "k8s/bootstrap.yaml", "k8s/peers.yaml", "k8s/trainer.yaml"}


# -- finding swarmrt commands -----------------------------------------------------------------
def substitute(text: str) -> str:
    """Replace shell expansions by a dummy value (what the CLI would receive)."""
    text = re.sub(r"\$\(\([^)]*\)\)", DUMMY, text)            # $((arithmetic))
    text = re.sub(r"\$\([^)]*\)", DUMMY, text)                # $(command)
    text = re.sub(r"\$\{[^}]*\}", DUMMY, text)                # ${VAR}, ${VAR:-x}, ${VAR##*-}
    return re.sub(r"\$[A-Za-z_][A-Za-z0-9_]*", DUMMY, text)   # $VAR


def unescape_dollars(text: str) -> str:
    """compose and Kubernetes turn ``$$`` into a literal ``$`` before the shell sees it."""
    return text.replace("$$", "$")


CONTROL = {"&&", "||", ";", "|", "&", "(", ")", "{", "}", ";;"}
KEYWORDS = {"then", "do", "else", "elif", "exec", "!", "time", "if", "while"}


def shell_commands(script: str) -> list[list[str]]:
    """argv (after ``swarmrt``) of every swarmrt command in a shell script, ``sh -c`` inside included."""
    found = []
    script = substitute(script).replace("\\\n", " ")
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in list(lexer) + [";"]:
            if token not in CONTROL:
                segment.append(token)
                continue
            found.extend(argv_commands(segment))
            segment = []
    return found


def argv_commands(argv: list[str]) -> list[list[str]]:
    """The swarmrt commands one process argv runs: ``swarmrt ...``, ``tini -- ...``, ``... sh -c SCRIPT``."""
    argv = list(argv)
    while argv and (argv[0] in KEYWORDS or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0])):
        argv = argv[1:]
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    if not argv:
        return []
    if argv[0] == "swarmrt":
        rest = argv[1:]
        cut = next((i for i, t in enumerate(rest) if t and set(t) <= set("<>&")), len(rest))
        return [rest[:cut]]
    for i in range(len(argv) - 2):  # sh -c SCRIPT, also behind a wrapper (kubectl exec ... -- sh -c)
        if argv[i] in ("sh", "bash") and argv[i + 1] == "-c":
            return shell_commands(argv[i + 2])
    return []


def mentions(text: str) -> int:
    return len(MENTION.findall(text))


def check_invocation(argv: list[str], where: str):
    """Parse like ``swarmrt`` does; an AssertionError naming the file and the CLI's complaint."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code == 0 and ("--help" in argv or "-h" in argv):
                return None
            raise AssertionError(f"{where}: `swarmrt {' '.join(argv)}` is not a valid invocation of the "
                                 f"current CLI: {err.getvalue().strip()}") from None
    for name in ("steps", "stages", "peers_per_stage", "trainers"):  # what main() checks after parsing
        value = getattr(args, name, None)
        assert value is None or value >= 1, f"{where}: --{name.replace('_', '-')} must be >= 1, got {value}"
    return args


# -- reading the files ------------------------------------------------------------------------
def dockerfile():
    """Instructions of deploy/Dockerfile as (INSTRUCTION, text), continuation lines joined."""
    out, pending = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += (" " if pending else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def image_argv():
    instructions = dockerfile()
    entrypoint = [json.loads(t) for i, t in instructions if i == "ENTRYPOINT"][-1]
    cmd = [json.loads(t) for i, t in instructions if i == "CMD"][-1]
    return entrypoint, cmd


def yaml_docs(rel: str) -> list:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def pod_specs(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [doc["spec"]]
    return []


def containers(spec):
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def container_argv(c, entrypoint, cmd) -> list[str]:
    """Kubernetes: command replaces ENTRYPOINT (and drops CMD), args replace CMD."""
    command, args = c.get("command"), c.get("args")
    argv = (command if command is not None else entrypoint) + (args if args is not None else
                                                               ([] if command is not None else cmd))
    return [unescape_dollars(a) for a in argv]


def service_argv(service, entrypoint, cmd) -> list[str]:
    """compose: entrypoint replaces ENTRYPOINT (and CMD), command replaces CMD; strings are shell-split."""
    ep, command = service.get("entrypoint"), service.get("command")
    ep = shlex.split(ep) if isinstance(ep, str) else ep
    command = shlex.split(command) if isinstance(command, str) else command
    argv = (ep if ep is not None else entrypoint) + (command if command is not None else
                                                     ([] if ep is not None else cmd))
    return [unescape_dollars(a) for a in argv]


def readme_scripts() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    return re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S)


def collect() -> dict[str, list[list[str]]]:
    """Every swarmrt invocation in deploy/, by file."""
    entrypoint, cmd = image_argv()
    found: dict[str, list[list[str]]] = {}
    found["Dockerfile"] = argv_commands(entrypoint + cmd) + [
        c for i, t in dockerfile() if i == "RUN" for c in shell_commands(t)]
    compose = yaml_docs("compose.yaml")[0]
    found["compose.yaml"] = [c for s in compose["services"].values() for c in argv_commands(
        service_argv(s, entrypoint, cmd))]
    sky = yaml_docs("skypilot.yaml")[0]
    found["skypilot.yaml"] = [c for key in ("setup", "run") for c in shell_commands(sky.get(key, ""))]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        rel = f"k8s/{path.name}"
        found[rel] = [c for doc in yaml_docs(rel) for spec in pod_specs(doc) for ct in containers(spec)
                      for c in argv_commands(container_argv(ct, entrypoint, cmd))]
    found["README.md"] = [c for script in readme_scripts() for c in shell_commands(script)]
    return found


# -- the checks -------------------------------------------------------------------------------
def test_every_file_under_deploy_is_known_to_this_test():
    files = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == EXPECTED_FILES, ("teach tests/unit/test_deploy.py to check these files: "
                                     f"{sorted(files - EXPECTED_FILES)}; gone: {sorted(EXPECTED_FILES - files)}")


def test_every_swarmrt_command_in_deploy_is_valid_for_the_current_cli():
    found = collect()
    for where, commands in found.items():
        for argv in commands:
            check_invocation(argv, f"deploy/{where}")
    subcommands = {w: sorted({a[0] for a in cmds if a and not a[0].startswith("-")}) for w, cmds in found.items()}
    assert subcommands["Dockerfile"] == ["demo"]
    assert subcommands["compose.yaml"] == ["bootstrap", "peer", "status", "train"]
    assert subcommands["skypilot.yaml"] == ["peer"]
    assert subcommands["k8s/bootstrap.yaml"] == ["bootstrap"]
    assert subcommands["k8s/peers.yaml"] == ["peer"]
    assert subcommands["k8s/trainer.yaml"] == ["train"]
    assert subcommands["README.md"] == ["bootstrap", "peer", "status", "train"]


def test_no_swarmrt_command_escapes_the_parser():
    """Every textual ``swarmrt <subcommand>`` in a file was found (and so checked) above."""
    found = collect()
    texts = {"Dockerfile": [t for i, t in dockerfile() if i == "RUN"], "README.md": readme_scripts()}
    for rel in ["compose.yaml", "skypilot.yaml"] + [f"k8s/{p.name}" for p in (DEPLOY / "k8s").glob("*.yaml")]:
        texts[rel] = [s for doc in yaml_docs(rel) for s in strings(doc)]
    implicit = {"Dockerfile": 1}  # ENTRYPOINT ["tini", "--", "swarmrt"] + CMD
    for where, chunks in texts.items():
        assert sum(map(mentions, chunks)) + implicit.get(where, 0) == len(found[where]), where


def test_the_checker_rejects_a_flag_the_cli_does_not_have():
    script = ". /opt/swarmrt/join.sh && exec swarmrt peer --config \"$CONFIG\" --initial-peers $MADDR --stage 0"
    (argv,) = shell_commands(script)
    assert argv == ["peer", "--config", DUMMY, "--initial-peers", DUMMY, "--stage", "0"]
    check_invocation(argv, "ok")
    with pytest.raises(AssertionError, match=r"deploy/x: `swarmrt peer .* --bogus 3` is not a valid invocation"
                                             r".*unrecognized arguments: --bogus"):
        check_invocation(argv + ["--bogus", "3"], "deploy/x")
    with pytest.raises(AssertionError, match="argument --steps: invalid int value"):
        check_invocation(["train", "--config", "c", "--initial-peers", "m", "--steps", "many"], "deploy/x")
    with pytest.raises(AssertionError, match="--steps must be >= 1"):
        check_invocation(["train", "--config", "c", "--initial-peers", "m", "--steps", "0"], "deploy/x")
    assert argv_commands(["tini", "--", "sh", "-c", "swarmrt status --initial-peers m > out"]) == [
        ["status", "--initial-peers", "m"]]


def test_run_configs_load_and_the_configmap_matches_deploy_run_toml(tmp_path):
    config = load_config(DEPLOY / "run.toml")
    (configmap,) = yaml_docs("k8s/configmap.yaml")
    assert configmap["kind"] == "ConfigMap" and configmap["data"]["run.toml"] == (DEPLOY / "run.toml").read_text()
    sky = yaml_docs("skypilot.yaml")[0]
    assert load_config(ROOT / sky["envs"]["SWARMRT_CONFIG"]) == config
    stages = config.num_stages
    for where, commands in collect().items():
        for argv in commands:
            args = check_invocation(argv, where)
            if args is not None and args.command == "peer" and args.stage is not None:
                assert 0 <= args.stage < stages, f"{where}: --stage {args.stage} but the run has {stages} stages"
    (peers, _) = yaml_docs("k8s/peers.yaml")
    env = {e["name"]: e.get("value") for e in peers["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SWARMRT_STAGES"] == str(stages)
    assert peers["spec"]["replicas"] % stages == 0, "peers.yaml: replicas should give every stage as many peers"


def test_dockerfile_flavours_entrypoint_user_and_ports():
    instructions = dockerfile()
    entrypoint, cmd = image_argv()
    assert entrypoint == ["tini", "--", "swarmrt"]
    args = dict(t.split("=", 1) for i, t in instructions if i == "ARG" and "=" in t)
    assert args["TORCH_FLAVOR"] == "cuda" and args["TORCH_VERSION"] == "2.13.0"
    stages = {t.split(" AS ")[-1].strip() for i, t in instructions if i == "FROM" and " AS " in t}
    assert {"base-cuda", "base-cpu"} <= stages
    assert [t for i, t in instructions if i == "FROM"][-1] == "base-${TORCH_FLAVOR}"
    assert args["CUDA_BASE"].startswith("nvidia/cuda:")
    text = (DEPLOY / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in text and '"torch==${TORCH_VERSION}"' in text
    users = [t for i, t in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {int(p) for i, t in instructions if i == "EXPOSE" for p in t.split()}
    assert {31337, 31400} <= exposed
    assert any(i == "COPY" and t == "deploy/join.sh /opt/swarmrt/join.sh" for i, t in instructions)


def test_compose_wiring_and_stop_grace():
    compose = yaml_docs("compose.yaml")[0]
    entrypoint, cmd = image_argv()
    services = compose["services"]
    boot = check_invocation(argv_commands(service_argv(services["bootstrap"], entrypoint, cmd))[0], "bootstrap")
    assert boot.host == "0.0.0.0" and f"{boot.port}:{boot.port}" in services["bootstrap"]["ports"]
    peer_stages = []
    for name, service in services.items():
        for argv in argv_commands(service_argv(service, entrypoint, cmd)):
            args = check_invocation(argv, f"compose {name}")
            if args.command in ("peer", "train", "status"):
                assert args.initial_peers == [DUMMY], f"{name} must join through the bootstrap's address"
                assert service["environment"]["SWARMRT_ADDR_FILE"] == boot.addr_file
                assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy"
            if args.command == "peer":
                peer_stages.append(args.stage)
                grace = float(str(service["stop_grace_period"]).removesuffix("s"))
                assert grace > args.grace, f"{name}: stop_grace_period {grace} s must exceed --grace {args.grace}"
    assert sorted(peer_stages) == list(range(load_config(DEPLOY / "run.toml").num_stages))


def k8s_docs():
    return {p.name: yaml_docs(f"k8s/{p.name}") for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def test_k8s_requests_grace_and_spot_scheduling():
    entrypoint, cmd = image_argv()
    kustomization = k8s_docs().pop("kustomization.yaml")[0]
    manifests = {n for n in k8s_docs() if n != "kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
    peers_seen = 0
    for name, docs in k8s_docs().items():
        for doc in docs:
            if name == "kustomization.yaml":
                continue
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name
            for spec in pod_specs(doc):
                for c in containers(spec):
                    requests = c.get("resources", {}).get("requests", {})
                    assert {"cpu", "memory"} <= set(requests), f"{name}: container {c['name']} needs cpu and memory requests"
                    for argv in argv_commands(container_argv(c, entrypoint, cmd)):
                        args = check_invocation(argv, name)
                        if args.command != "peer":
                            continue
                        peers_seen += 1
                        tgps = spec.get("terminationGracePeriodSeconds", 30)
                        assert tgps >= args.grace, f"{name}: terminationGracePeriodSeconds {tgps} < --grace {args.grace}"
                        assert requests.get("nvidia.com/gpu") == c["resources"]["limits"].get("nvidia.com/gpu")
                        tolerated = {t["key"] for t in spec["tolerations"]}
                        assert {"cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"} <= tolerated
                        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                        keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
                        assert {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType",
                                "karpenter.sh/capacity-type", "kubernetes.azure.com/scalesetpriority"} <= keys
                        mounts = {m["mountPath"] for m in c["volumeMounts"]}
                        assert "/shared" in mounts, f"{name}: peers need the shared volume for checkpoints"
    assert peers_seen == 1


def test_k8s_bootstrap_service_and_trainer_job():
    entrypoint, cmd = image_argv()
    docs = k8s_docs()
    deployment, service = docs["bootstrap.yaml"]
    (c,) = containers(pod_specs(deployment)[0])
    (argv,) = argv_commands(container_argv(c, entrypoint, cmd))
    boot = check_invocation(argv, "bootstrap.yaml")
    assert service["kind"] == "Service"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert [named[p["targetPort"]] for p in service["spec"]["ports"]] == [boot.port]
    (job,) = docs["trainer.yaml"]
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    (claim,) = docs["storage.yaml"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("bootstrap.yaml", "peers.yaml", "trainer.yaml"):
        for doc in docs[name]:
            for spec in pod_specs(doc):
                claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
                assert claims == {claim["metadata"]["name"]}, name


def test_skypilot_task_uses_spot_with_recovery_and_joins_by_env():
    sky = yaml_docs("skypilot.yaml")[0]
    resources = sky["resources"]
    assert resources["use_spot"] is True and resources["job_recovery"]["strategy"] in ("FAILOVER", "EAGER_NEXT_REGION")
    assert "SWARMRT_INITIAL_PEERS" in sky["envs"] and "$SWARMRT_INITIAL_PEERS" in sky["run"]
    (argv,) = shell_commands(sky["run"])
    assert check_invocation(argv, "skypilot.yaml").port in resources["ports"]


# -- join.sh, run for real (a shell and a python, no network) -----------------------------------
def run_join(tmp_path, **env):
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
            "SWARMRT_PYTHON": sys.executable, "SWARMRT_NODE_CONFIG": str(tmp_path / "node.yaml")}
    script = f'. "{DEPLOY / "join.sh"}" && printf "%s\\n%s\\n%s\\n" "$MADDR" "$CONFIG" "$HOST"'
    return subprocess.run(["sh", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_join_reads_the_address_file_and_finds_this_nodes_host(tmp_path):
    addr = tmp_path / "bootstrap.addr"
    addr.write_text("/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWabc\n/ip4/10.1.2.3/tcp/31337/p2p/12D3KooWabc\n")
    result = run_join(tmp_path, SWARMRT_CONFIG=str(DEPLOY / "run.toml"), SWARMRT_ADDR_FILE=str(addr),
                      SWARMRT_HOST="10.9.8.7")
    assert result.returncode == 0, result.stderr
    maddr, config_path, host = result.stdout.splitlines()
    assert maddr.split() == ["/ip4/10.1.2.3/tcp/31337/p2p/12D3KooWabc"]
    assert host == "10.9.8.7"  # passed as --host / --announce-host: the config is not rewritten
    assert config_path == str(DEPLOY / "run.toml")
    result = run_join(tmp_path, SWARMRT_CONFIG=str(DEPLOY / "run.toml"), SWARMRT_INITIAL_PEERS="/ip4/1.2.3.4/tcp/5/p2p/X /dns4/b/tcp/5/p2p/X")
    assert result.returncode == 0 and result.stdout.splitlines()[0].split() == ["/ip4/1.2.3.4/tcp/5/p2p/X", "/dns4/b/tcp/5/p2p/X"]


def test_join_fails_with_one_clear_line(tmp_path):
    result = run_join(tmp_path, SWARMRT_ADDR_FILE=str(tmp_path / "a"))
    assert result.returncode == 2 and "set SWARMRT_CONFIG" in result.stderr
    result = run_join(tmp_path, SWARMRT_CONFIG=str(DEPLOY / "run.toml"))
    assert result.returncode == 2 and "SWARMRT_ADDR_FILE" in result.stderr
    result = run_join(tmp_path, SWARMRT_CONFIG=str(DEPLOY / "run.toml"), SWARMRT_ADDR_FILE=str(tmp_path / "none"),
                      SWARMRT_WAIT_S="0")
    assert result.returncode == 1 and "no bootstrap address in" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nlr = -1\n")
    result = run_join(tmp_path, SWARMRT_CONFIG=str(bad), SWARMRT_INITIAL_PEERS="/ip4/1.2.3.4/tcp/5/p2p/X")
    assert result.returncode != 0 and "join.sh: config error: optimizer.lr" in result.stderr
