#!/usr/bin/env python3
"""Runs a systemd unit's ExecStart= line as systemd would, without systemd as PID 1.

    execstart.py UNIT [--set KEY=VALUE]... [--print]

The environment is the unit's EnvironmentFile= (read as systemd reads it) on top of a
systemd-like base (PATH only), then each --set, which stands for an administrator's edit of
that file. The command line is expanded by systemd's rules (systemd.service(5), "Command
lines"): "${VAR}" is replaced inside its word, a word that is exactly "$VAR" becomes the
value split at whitespace (zero words when empty), "$$" is a literal "$". The process then
replaces this one (exec), so its exit status and signals are the daemon's. --print prints
the argv, one word per line, instead.
"""

import os
import re
import sys

NAME = r"[A-Za-z_][A-Za-z0-9_]*"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fail(msg):
    sys.exit(f"execstart.py: {msg}")


def unit_settings(path):
    """The [Service] section's (key, value) pairs in order; continuation lines joined."""
    section, out, pending = None, [], ""
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if "=" not in line:
                fail(f"{path}:{lineno}: not KEY=VALUE: {line!r}")
            key, value = line.split("=", 1)
            if section == "Service":
                out.append((key.strip(), value.strip()))
    return out


def environment_file(path):
    """KEY=VALUE lines; '#' and ';' comments; one level of surrounding quotes removed."""
    env = {}
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            m = re.fullmatch(rf"({NAME})\s*=\s*(.*)", line)
            if not m:
                fail(f"{path}:{lineno}: not KEY=VALUE: {line!r}")
            key, value = m.groups()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key] = value
    return env


def expand(command, env):
    if any(q in command for q in "'\""):
        fail("quoted ExecStart words are not supported by this runner")
    argv = []
    for word in command.split():
        m = re.fullmatch(rf"\$({NAME})", word)
        if m:
            argv.extend(env.get(m.group(1), "").split())
            continue
        word = re.sub(rf"\$\{{({NAME})\}}", lambda m: env.get(m.group(1), ""), word)
        argv.append(word.replace("$$", "$"))
    return argv


def main():
    args = sys.argv[1:]
    if not args:
        fail("usage: execstart.py UNIT [--set KEY=VALUE]... [--print]")
    unit, overrides, print_only = args[0], {}, False
    rest = args[1:]
    while rest:
        if rest[0] == "--print":
            print_only, rest = True, rest[1:]
        elif rest[0] == "--set" and len(rest) > 1 and "=" in rest[1]:
            k, v = rest[1].split("=", 1)
            overrides[k], rest = v, rest[2:]
        else:
            fail(f"unknown argument {rest[0]!r}")
    settings = unit_settings(unit)
    env = {"PATH": BASE_PATH}
    starts = []
    for key, value in settings:
        if key == "EnvironmentFile":
            optional = value.startswith("-")
            path = value.lstrip("-")
            if os.path.exists(path):
                env.update(environment_file(path))
            elif not optional:
                fail(f"{unit}: EnvironmentFile {path} does not exist")
        elif key == "Environment":
            fail(f"{unit}: Environment= is not supported by this runner")
        elif key == "ExecStart":
            starts.append(value)
    if len(starts) != 1:
        fail(f"{unit}: expected one ExecStart=, found {len(starts)}")
    command = starts[0]
    if command[:1] in "-@:+!":
        fail(f"{unit}: ExecStart prefixes are not supported by this runner")
    env.update(overrides)
    argv = expand(command, env)
    if print_only:
        print("\n".join(argv))
        return
    os.execve(argv[0], argv, env)


main()
