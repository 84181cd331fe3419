"""The image without a Docker engine: the Dockerfile's own steps, run under bubblewrap.

`build()` reads the Dockerfile and carries out its build stage: each `COPY` copies from the
repository (minus what .dockerignore keeps out of the context), each `RUN` runs with bash inside
bubblewrap, where `/opt` is the stage's directory and the rest of the host is read-only (the
host's Python 3.11 standing in for the base image's). The final stage's `COPY --from=build`
lines must copy only what the build stage made under /opt, so the same directory is the image's
/opt. `run()` then starts a command the way the image would: the final stage's ENV, WORKDIR,
numeric USER and ENTRYPOINT, a read-only root, and only /tmp writable.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .chartkit import ROOT

CACHE = ROOT / "var" / "image-test"
# The base image's Python: this machine's 3.11 (the one running the tests), made visible on its
# own inside the sandbox (/root, where pyenv keeps it, is otherwise hidden).
BASE_PYTHON = Path(sys.base_prefix)


@dataclass
class Stage:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "0:0"
    entrypoint: list[str] = field(default_factory=list)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (instruction, arguments)


def parse(dockerfile: Path = ROOT / "Dockerfile") -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        elif instruction == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else f"stage{len(stages)}"))
        elif instruction == "ENV":
            stage = stages[-1]
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage.env[key] = value.replace("$PATH", stage.env.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        elif instruction == "WORKDIR":
            stages[-1].workdir = rest
            stages[-1].steps.append(("WORKDIR", rest))
        elif instruction == "USER":
            stages[-1].user = rest
        elif instruction == "ENTRYPOINT":
            import json

            stages[-1].entrypoint = json.loads(rest)
        elif instruction in ("COPY", "RUN"):
            stages[-1].steps.append((instruction, rest))
    return stages


def _ignored(rel: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#") and not p.startswith("!") and p.strip() != "**"]
    parts = rel.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/").removeprefix("**/")
        if fnmatch.fnmatch(rel, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            return True
    return False


def _copy(src: str, dst: Path) -> None:
    source = ROOT / src
    if source.is_dir():
        for path in source.rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not _ignored(rel):
                target = dst / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dst)


def _inputs_digest() -> str:
    h = hashlib.sha256()
    for name in ("Dockerfile", ".dockerignore", "requirements.txt", "operator/requirements.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


def build() -> Path:
    """The image's /opt, built by the Dockerfile's build stage (dependencies cached by digest)."""
    stages = parse()
    build_stage, final = stages[0], stages[-1]
    for instruction, rest in final.steps:
        if instruction == "COPY":
            src, dst = rest.removeprefix(f"--from={build_stage.name} ").split()
            assert rest.startswith(f"--from={build_stage.name} ") and src == dst and src.startswith("/opt/"), rest
        elif instruction == "RUN":
            raise AssertionError(f"the final stage runs {rest!r}: not reproduced here")
    opt = CACHE / _inputs_digest() / "opt"
    for old in CACHE.glob("*"):
        if old != opt.parent and old.is_dir():
            shutil.rmtree(old)  # the build of an older Dockerfile or requirements
    stamp = opt.parent / "dependencies-done"
    fresh = not stamp.exists()
    if fresh and opt.exists():
        shutil.rmtree(opt)
    opt.mkdir(parents=True, exist_ok=True)
    workdir = "/"
    deps_done = False
    for instruction, rest in build_stage.steps:
        if instruction == "WORKDIR":
            assert rest.startswith("/opt/"), f"WORKDIR {rest} outside /opt is not reproduced here"
            workdir = rest
            (opt / rest.removeprefix("/opt/")).mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, dst = rest.split()
            assert dst.startswith("./") or dst.startswith("/opt"), rest
            base = Path(workdir) / dst if dst.startswith("./") else Path(dst)
            for src in sources:
                target = opt / base.relative_to("/opt")
                if src.endswith("/"):
                    if target.exists():
                        shutil.rmtree(target)
                    _copy(src.rstrip("/"), target)
                else:
                    _copy(src, target)
        elif instruction == "RUN":
            is_deps = "pip install" in rest
            if is_deps and not fresh:
                deps_done = True
                continue  # the dependency layer is cached, as Docker would
            sandbox(["bash", "-euo", "pipefail", "-c", rest], opt, env=build_stage.env, cwd=workdir,
                    writable_opt=True, net=True, uid=0, timeout=900)
            deps_done = deps_done or is_deps
            if is_deps:
                stamp.touch()
    assert deps_done, "the Dockerfile installs no dependencies?"
    return opt


def sandbox(argv: list[str], opt: Path, *, env: dict[str, str], cwd: str, writable_opt: bool = False,
            net: bool = True, uid: int = 10001, gid: int | None = None, tmp: Path | None = None,
            timeout: float | None = None, background: bool = False, log: Path | None = None,
            ) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """argv under bubblewrap: read-only host root, the image's /opt, /tmp the only writable path."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bwrap not found: run `make helm-deps` (installs Debian's bubblewrap)")
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           "--bind" if writable_opt else "--ro-bind", str(opt), "/opt",
           *(["--bind", str(tmp), "/tmp"] if tmp else ["--tmpfs", "/tmp"]),
           "--tmpfs", "/root", "--ro-bind", str(BASE_PYTHON), str(BASE_PYTHON),
           "--unshare-all", *(["--share-net"] if net else []), "--die-with-parent", "--new-session",
           "--uid", str(uid), "--gid", str(uid if gid is None else gid), "--chdir", cwd, "--clearenv"]
    base_env = {**env, "PATH": env.get("PATH", "/usr/local/bin:/usr/bin:/bin") + f":{BASE_PYTHON}/bin"}
    for key, value in base_env.items():
        cmd += ["--setenv", key, value]
    cmd += argv
    if background:
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and uid == 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def image_user() -> tuple[int, int]:
    user = parse()[-1].user
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def image_env() -> dict[str, str]:
    return dict(parse()[-1].env)


def entrypoint() -> list[str]:
    return parse()[-1].entrypoint


def free_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("LC_")}
