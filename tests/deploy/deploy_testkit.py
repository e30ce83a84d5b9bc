"""Helpers for the deploy tests: a small Dockerfile parser, .dockerignore semantics, PromQL walking,
the service's settings and error codes as the deployment files must use them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "diffprompt.json"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"


def tool(name: str) -> str | None:
    """A command on PATH or next to this interpreter (console scripts of the venv)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else None


# -- Dockerfile -------------------------------------------------------------------------------------

@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, line continuations joined
    line: int  # 1-based line of the instruction's first line


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, in order (values unquoted, ${...} left as written)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {ins.line}: only the ENV key=value form is supported: {ins.args!r}"
                out[key] = value
        return out

    def args(self) -> dict[str, str | None]:
        return dict(parse_arg(i.args) for i in self.all("ARG"))

    def workdir(self) -> str:
        workdirs = self.all("WORKDIR")
        return workdirs[-1].args.strip() if workdirs else "/"


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} (stages: {[s.name for s in self.stages]})")


def parse_arg(text: str) -> tuple[str, str | None]:
    token = shlex.split(text)[0]
    key, sep, value = token.partition("=")
    return key, (value if sep else None)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction text): comments and blank lines dropped, continuations joined."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comment lines inside a continuation are dropped too (as Docker does)
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].rstrip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    if buffer:
        yield start, " ".join(buffer)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text()):
        cmd, _, args = text.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name, parts[0]))
        elif not stages:
            assert cmd == "ARG", f"line {line}: only ARG may come before the first FROM"
            key, value = parse_arg(args)
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(cmd, args.strip(), line))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY/ADD -> (flags, sources, destination)."""
    tokens = shlex.split(ins.args)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, tokens[:-1], tokens[-1]


def run_parts(ins: Instruction) -> tuple[list[dict[str, str]], str]:
    """RUN -> (its --mount flags as dicts, e.g. {"type": "secret", "id": "pip-conf"}, the command)."""
    assert ins.cmd == "RUN", ins
    rest, mounts = ins.args, []
    while m := re.match(r"--(\w+)=(\S+)\s+", rest):
        if m.group(1) == "mount":
            mount = dict(part.partition("=")[::2] for part in m.group(2).split(","))
            mount.setdefault("type", "bind")
            if mount["type"] == "secret":
                mount.setdefault("target", f"/run/secrets/{mount['id']}")
            mounts.append(mount)
        rest = rest[m.end():]
    return mounts, rest


# -- .dockerignore ----------------------------------------------------------------------------------

def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's .dockerignore rules: each pattern matches a path or one of its parent directories;
    `!` re-includes; the last matching rule wins."""

    def __init__(self, path: Path = DOCKERIGNORE):
        self.rules: list[tuple[bool, re.Pattern]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            self.rules.append((negate, _glob_regex(pattern)))

    def excluded(self, relpath: str) -> bool:
        parts = Path(relpath).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                excluded = not negate
        return excluded


def context_files(source: str, ignore: DockerIgnore) -> list[Path]:
    """Files of the build context under `source` (relative to the repo) that survive .dockerignore."""
    root = REPO / source
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [p for p in files if not ignore.excluded(p.relative_to(REPO).as_posix())]


# -- settings and error codes of the service ---------------------------------------------------------

def settings_problems(env: dict[str, str], artifact_dir: Path) -> list[str]:
    """Why these DIFFPROMPT_* values would not start the service (unknown names, invalid values)."""
    from pydantic import ValidationError

    from diffprompt.service.settings import Settings

    known = {f"DIFFPROMPT_{name.upper()}" for name in Settings.model_fields}
    problems = [f"{key} is not a service setting (a typo is silently ignored)"
                for key in env if key.startswith("DIFFPROMPT_") and key not in known]
    values = {key[len("DIFFPROMPT_"):].lower(): value for key, value in env.items()
              if key in known and key != "DIFFPROMPT_ARTIFACT_DIR"}
    saved = {k: v for k, v in os.environ.items() if k.startswith("DIFFPROMPT_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({f"DIFFPROMPT_{k.upper()}": str(v) for k, v in values.items()})
        Settings(_env_file=None, artifact_dir=artifact_dir)
    except ValidationError as e:
        problems.append(str(e))
    finally:
        for key in [k for k in os.environ if k.startswith("DIFFPROMPT_")]:
            del os.environ[key]
        os.environ.update(saved)
    return problems


def error_codes() -> set[str]:
    """Every `reason` label value diffprompt_errors_total can carry."""
    from diffprompt.service import errors

    codes = {"internal_error", "http_error"} | set(errors.HTTP_CODES.values())

    def walk(cls: type) -> None:
        for sub in cls.__subclasses__():
            codes.add(sub.code)
            walk(sub)

    walk(errors.ServiceError)
    return codes


# -- PromQL -----------------------------------------------------------------------------------------

def promql():
    """The promql-parser module (dev extra); the tests that need it skip, saying so, without it."""
    import pytest

    return pytest.importorskip("promql_parser", reason="promql-parser (dev extra) parses PromQL to find metric names")


def parse_promql(expr: str):
    try:
        return promql().parse(expr)
    except ValueError as e:
        raise AssertionError(f"PromQL does not parse ({e}): {expr}") from None


def walk_promql(node) -> Iterator:
    """Every node of a promql_parser AST, depth first."""
    p = promql()

    yield node
    children: list = []
    if isinstance(node, p.AggregateExpr):
        children = [node.expr, node.param]
    elif isinstance(node, p.BinaryExpr):
        children = [node.lhs, node.rhs]
    elif isinstance(node, p.Call):
        children = list(node.args)
    elif isinstance(node, p.ParenExpr | p.SubqueryExpr | p.UnaryExpr):
        children = [node.expr]
    elif isinstance(node, p.MatrixSelector):
        children = [node.vector_selector]
    for child in children:
        if child is not None:
            yield from walk_promql(child)


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value), op one of = != =~ !~


def selectors(expr: str) -> list[Selector]:
    p = promql()

    ops = [(p.MatchOp.Equal, "="), (p.MatchOp.NotEqual, "!="), (p.MatchOp.Re, "=~"), (p.MatchOp.NotRe, "!~")]

    def op(value) -> str:
        return next(symbol for member, symbol in ops if value == member)

    found = []
    for node in walk_promql(parse_promql(expr)):
        if isinstance(node, p.VectorSelector):
            matchers = [(m.name, op(m.op), m.value) for m in node.matchers.matchers]
            name = node.name or next((v for n, o, v in matchers if n == "__name__" and o == "="), None)
            assert name, f"selector without a metric name in {expr}"
            found.append(Selector(name, tuple(m for m in matchers if m[0] != "__name__")))
    return found


def histogram_quantile_problems(expr: str) -> list[str]:
    """histogram_quantile must get `_bucket` series, aggregated with `le` kept."""
    p = promql()

    problems = []
    for node in walk_promql(parse_promql(expr)):
        if isinstance(node, p.Call) and node.func.name == "histogram_quantile":
            inner = node.args[1]
            names = [n.name for n in walk_promql(inner) if isinstance(n, p.VectorSelector)]
            if not names or not all(n.endswith("_bucket") for n in names):
                problems.append(f"histogram_quantile over {names}, not _bucket series: {expr}")
            for agg in (n for n in walk_promql(inner) if isinstance(n, p.AggregateExpr)):
                keeps_le = agg.modifier is not None and agg.modifier.type == p.AggModifierType.By \
                    and "le" in agg.modifier.labels
                if not keeps_le:
                    problems.append(f"an aggregation under histogram_quantile drops `le`: {expr}")
    return problems


GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana variables by what they stand for: intervals by durations, the rest by `.*`."""
    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", lambda m: GRAFANA_VARS.get(m.group(1), ".*"), expr)


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of the dashboard."""
    dashboard = json.loads(path.read_text())
    out = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            out.append((f"variable {var['name']}", m.group(1) if m else query))
    return out


def rule_groups(path: Path = PROMETHEUS_DIR / "alerts.yml") -> list[dict]:
    return yaml.safe_load(path.read_text())["groups"]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for g in rule_groups() for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]


def adapter_queries() -> list[tuple[str, str]]:
    """The adapter's series queries, and its metrics queries with the Go template filled in."""
    out = []
    for rule in adapter_rules():
        series = selectors(rule["seriesQuery"])
        assert len(series) == 1, rule["seriesQuery"]
        query = (rule["metricsQuery"].replace("<<.Series>>", series[0].name)
                 .replace("<<.LabelMatchers>>", 'namespace="diffprompt",pod=~"diffprompt-a|diffprompt-b"')
                 .replace("<<.GroupBy>>", "pod"))
        out += [(f"adapter seriesQuery {series[0].name}", rule["seriesQuery"]),
                (f"adapter metricsQuery {series[0].name}", query)]
    return out


def adapter_metric_names() -> dict[str, str]:
    """Custom metric name the adapter serves -> the series it reads."""
    out = {}
    for rule in adapter_rules():
        series = selectors(rule["seriesQuery"])[0].name
        pattern, as_ = rule["name"]["matches"], rule["name"].get("as") or ""
        m = re.search(pattern, series)
        assert m, f"adapter rule name.matches {pattern!r} does not match its series {series}"
        out[m.expand(as_.replace("${", "\\g<").replace("}", ">")) if as_ else m.group(0)] = series
    return out


# -- YAML -------------------------------------------------------------------------------------------

def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, from every resource listed by deploy/k8s/kustomization.yaml."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(K8S / resource):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out
