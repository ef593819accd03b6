#!/usr/bin/env python3
"""Install what `make e2e` drives, idempotently, into a cache outside the repository.

    python3 tests/e2e/setup_tools.py [--cache DIR]

The cache (default $PROXYPAL_E2E_CACHE, else ~/.cache/proxypal-e2e) holds:

    npm/     the agent CLIs, pinned, from the npm registry (node_modules/.bin/claude ...)
    venv/    a virtual environment with pinned pytest and the official SDKs
    tools.json   what is installed where, or why it was skipped (read by the tests)

Chromium and its driver come from Debian's packages (apt-get, as root) when missing.
Anything that cannot be installed is skipped with its reason printed; the exit code is 1
only when the venv (needed to run the suite at all) is unusable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import venv

NPM_PACKAGES = {                       # command -> (package, exact version)
    "claude": ("@anthropic-ai/claude-code", "2.1.197"),
    "gemini": ("@google/gemini-cli", "0.61.0"),
    "codex": ("@openai/codex", "0.171.0"),
}
PIP_PACKAGES = {                       # distribution -> exact version
    "pytest": "9.2.0",
    "openai": "3.57.0",
    "anthropic": "2.16.0",
    "google-genai": "3.6.1",
    "selenium": "4.51.0",              # 4.52.0 needs a certifi newer than PyPI has
}
APT_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}   # command -> package

NPM_TIMEOUT = 900
PIP_TIMEOUT = 900
APT_TIMEOUT = 900


def default_cache() -> str:
    return os.environ.get("PROXYPAL_E2E_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "proxypal-e2e")


def say(line: str) -> None:
    print(f"e2e setup: {line}", flush=True)


def run(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, output captured; a time-out counts as a failure (returncode 124)."""
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        return subprocess.CompletedProcess(cmd, 124, out + f"\n(timed out after {timeout:g}s)")
    except OSError as exc:
        return subprocess.CompletedProcess(cmd, 127, str(exc))


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# -- npm ----------------------------------------------------------------------------

def installed_npm_version(prefix: str, package: str) -> str:
    manifest = os.path.join(prefix, "node_modules", *package.split("/"), "package.json")
    try:
        with open(manifest, encoding="utf-8") as f:
            return json.load(f).get("version", "")
    except (OSError, ValueError):
        return ""


def install_npm(cache: str) -> dict:
    prefix = os.path.join(cache, "npm")
    tools = {}
    npm = shutil.which("npm")
    node = shutil.which("node")
    missing = []
    for command, (package, version) in NPM_PACKAGES.items():
        if installed_npm_version(prefix, package) != version:
            missing.append(f"{package}@{version}")
    if missing and not (npm and node):
        reason = "skipped: npm not found" if not npm else "skipped: node not found"
        say(f"{', '.join(missing)}: {reason}")
    elif missing:
        os.makedirs(prefix, exist_ok=True)
        manifest = os.path.join(prefix, "package.json")
        if not os.path.exists(manifest):
            with open(manifest, "w", encoding="utf-8") as f:
                json.dump({"name": "proxypal-e2e-tools", "private": True}, f)
        say(f"npm install {' '.join(missing)}")
        done = run([npm, "install", "--no-audit", "--no-fund", "--save-exact",
                    "--prefix", prefix] + missing, NPM_TIMEOUT)
        if done.returncode != 0:          # one bad package must not cost the others
            say(f"npm install failed together ({tail(done.stdout, 3)}); trying one by one")
            for spec in missing:
                one = run([npm, "install", "--no-audit", "--no-fund", "--save-exact",
                           "--prefix", prefix, spec], NPM_TIMEOUT)
                if one.returncode != 0:
                    say(f"{spec}: skipped: npm install failed: {tail(one.stdout)}")
    for command, (package, version) in NPM_PACKAGES.items():
        path = os.path.join(prefix, "node_modules", ".bin", command)
        got = installed_npm_version(prefix, package)
        if got == version and os.path.exists(path):
            tools[command] = {"path": path, "version": version, "package": package}
        else:
            why = "npm not found" if not npm else "node not found" if not node else \
                f"{package}@{version} did not install"
            tools[command] = {"skipped": why, "package": package, "version": version}
    return tools


# -- Python venv --------------------------------------------------------------------

def venv_python(cache: str) -> str:
    return os.path.join(cache, "venv", "bin", "python")


def venv_versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m\n"
            f"names = {sorted(PIP_PACKAGES)!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = ''\n"
            "print(json.dumps(out))\n")
    done = run([python, "-c", code], 60)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (ValueError, IndexError):
        return {}


def install_venv(cache: str) -> dict:
    python = venv_python(cache)
    if not os.path.exists(python):
        say(f"creating venv {os.path.dirname(os.path.dirname(python))} ({sys.version.split()[0]})")
        try:
            venv.create(os.path.dirname(os.path.dirname(python)), with_pip=True, clear=True)
        except Exception as exc:      # ensurepip missing, disk full, ...
            say(f"skipped: cannot create the venv: {exc}")
            return {"skipped": f"cannot create the venv: {exc}"}
    have = venv_versions(python)
    wanted = [f"{name}=={version}" for name, version in PIP_PACKAGES.items()
              if have.get(name) != version]
    if wanted:
        say(f"pip install {' '.join(wanted)}")
        done = run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
                   + wanted, PIP_TIMEOUT)
        if done.returncode != 0:
            say(f"pip install failed together ({tail(done.stdout, 3)}); trying one by one")
            for spec in wanted:
                one = run([python, "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", spec], PIP_TIMEOUT)
                if one.returncode != 0:
                    say(f"{spec}: skipped: pip install failed: {tail(one.stdout)}")
        have = venv_versions(python)
    packages = {}
    for name, version in PIP_PACKAGES.items():
        packages[name] = {"version": version} if have.get(name) == version else \
            {"skipped": f"pip could not install {name}=={version}", "version": version}
    return {"python": python, "packages": packages}


# -- Chromium -----------------------------------------------------------------------

def chromium_version(path: str) -> str:
    done = run([path, "--version"], 30)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout else ""


def install_chromium() -> dict:
    found = {cmd: shutil.which(cmd) for cmd in APT_PACKAGES}
    missing = [APT_PACKAGES[cmd] for cmd, path in found.items() if not path]
    if missing:
        apt = shutil.which("apt-get")
        if not apt:
            reason = "apt-get not found"
        elif os.geteuid() != 0:
            reason = "not root, so apt-get cannot install"
        else:
            say(f"apt-get install {' '.join(missing)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = [apt, "install", "-y", "--no-install-recommends"] + missing
            done = run(cmd, APT_TIMEOUT, env=env)
            if done.returncode != 0:          # stale package lists: refresh once, retry
                run([apt, "update"], APT_TIMEOUT, env=env)
                done = run(cmd, APT_TIMEOUT, env=env)
            reason = "" if done.returncode == 0 else f"apt-get install failed: {tail(done.stdout)}"
        if reason:
            say(f"{', '.join(missing)}: skipped: {reason}")
        found = {cmd: shutil.which(cmd) for cmd in APT_PACKAGES}
        if not all(found.values()):
            return {"skipped": reason or "chromium did not install"}
    return {"path": found["chromium"], "driver": found["chromedriver"],
            "version": chromium_version(found["chromium"])}


# -- main ---------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=default_cache(), help="install folder (default %(default)s)")
    args = parser.parse_args(argv)
    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    tools = {"node": {"path": shutil.which("node") or "",
                      "version": run(["node", "--version"], 30).stdout.strip()
                      if shutil.which("node") else ""}}
    tools.update(install_npm(cache))
    tools["venv"] = install_venv(cache)
    tools["chromium"] = install_chromium()
    with open(os.path.join(cache, "tools.json"), "w", encoding="utf-8") as f:
        json.dump(tools, f, indent=2)
    for name in list(NPM_PACKAGES) + ["chromium"]:
        info = tools[name]
        say(f"{name:9} " + (info.get("version", "") if "skipped" not in info
                             else f"skipped: {info['skipped']}"))
    for name, info in (tools["venv"].get("packages") or {}).items():
        say(f"{name:9} " + (info["version"] if "skipped" not in info else f"skipped: {info['skipped']}"))
    if "skipped" in tools["venv"] or "skipped" in tools["venv"]["packages"]["pytest"]:
        say("the venv has no pytest, so the e2e suite cannot run")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
