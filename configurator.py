"""
The configurator every script shares (nanoGPT's idea, as functions): lower-case module constants are the config, overridden by
a Python file named on the command line, then --key=value flags (literals of the default's type); their comments are --help.

    python train.py config/demo.py --learning_rate=3e-4 --output_dir='"out/x"'
    python train.py --help
    python configurator.py train.py sample.py bench.py plan.py > docs/config.md      # the same, for every script
"""
import ast
import os
import sys

import torch


def configure(defaults, argv=None):
    """defaults: the script's globals(), updated in place -> the config: its lower-case plain values not starting with '_'."""
    keys = [k for k, v in defaults.items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("--help", "-h"):
            print(describe(defaults["__file__"], defaults.get("CHOICES", {})))
            raise SystemExit(0)
        if not arg.startswith("--"):
            scope = {}
            with open(arg) as fh:
                exec(fh.read(), {}, scope)
            for k, v in scope.items():
                if not k.startswith("_"):
                    set_key(defaults, keys, k, v, arg)
            continue
        key, sep, value_text = arg[2:].partition("=")
        if not sep:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        try:
            value = ast.literal_eval(value_text)
        except (ValueError, SyntaxError):
            value = value_text  # a bare string: --output_dir=out/x
        set_key(defaults, keys, key, value, arg)
    return {k: defaults[k] for k in keys}


def set_key(defaults, keys, key, value, where):
    if key not in keys:
        near = [k for k in keys if k.split("_")[0] == key.split("_")[0]][:5]
        raise SystemExit(f"unknown config key {key!r} (from {where}); similar keys: {near}")
    old = defaults[key]
    if old is not None and value is not None and not isinstance(value, type(old)) and not (isinstance(old, float) and isinstance(value, int)):
        raise SystemExit(f"config key {key!r} is a {type(old).__name__} (default {old!r}); got {value!r} from {where}")
    defaults[key] = float(value) if isinstance(old, float) and isinstance(value, int) else value


# -----------------------------------------------------------------------------
# the config as documentation: read from the script's source, between its two `# ---` rules


def settings(path):
    """-> [(group, [(name, default as written, comment)])] of the script at `path`, between its first two `# ---` rules."""
    lines = open(path, encoding="utf-8").read().split("\n")
    rules = [i for i, line in enumerate(lines) if line.startswith("# ---")]
    groups, last = [], None
    for line in lines[rules[0] + 1:rules[1]]:
        if not line.strip():
            last = None
        elif line.startswith("#") and last is None:  # after a blank line (or the first rule): a group's name
            groups.append((line.lstrip("# "), []))
        elif line.startswith("#"):  # right under a constant: more of its comment
            last[2] += " " + line.lstrip("# ")
        else:
            code, _, comment = line.partition("  # ")
            name, _, default = code.partition(" = ")
            if not groups:
                groups.append(("", []))
            last = [name.strip(), default.strip(), comment.strip()]
            groups[-1][1].append(last)
    return groups


def describe(path, choices):
    """What --help prints, in markdown (docs/config.md): settings(path), each option with its choices (keys of choices[name])."""
    out = [f"## `python {os.path.basename(path)} [config/x.py ...] [--key=value ...]`"]
    for group, rows in settings(path):
        out += ["", f"**{group}**" if group else "", ""]
        for name, default, comment in rows:
            one_of = f" (one of: {', '.join(f'`{k}`' for k in choices[name])})" if name in choices else ""
            out.append(f"- `{name} = {default}`" + (f": {comment}{one_of}" if comment or one_of else ""))
    return "\n".join(out) + "\n"


# -----------------------------------------------------------------------------
# checks every script runs on its config before it reads a file


def problems(c, choices, ranges=None):
    """Each option (choices: name -> its mapping) whose value is not a key, with the near miss when there is one, and each
    value outside its range (ranges: name -> (test, what the value must be))."""
    out = []
    for key, allowed in choices.items():
        v = getattr(c, key)
        if v not in allowed:
            near = [a for a in allowed if isinstance(v, str) and a.lower() == v.lower()]
            out.append(f"{key}={v!r} is not one of {', '.join(map(repr, allowed))}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    for key, (ok, what) in (ranges or {}).items():
        try:
            good = ok(getattr(c, key))
        except TypeError:
            good = False
        if not good:
            out.append(f"{key}={getattr(c, key)!r} must be {what}")
    return out


def device_problem(name, what):
    """None when `name` is a device this torch can use, else why not."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        return f"{what}={name!r} is not a device name (cpu, cuda, cuda:1, ...)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
            return f"{what}={name!r} but this machine has {build}; use --{what}=cpu or install a CUDA build of torch"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{what}={name!r} but only {torch.cuda.device_count()} GPU(s) are visible"
    elif dev.type != "cpu":
        return f"{what}={name!r}: only cpu and cuda devices are supported"
    return None


if __name__ == "__main__":
    import importlib
    print("# Settings\n\nEvery setting of each script, its default and its comment, generated from the scripts by\n"
          f"`python configurator.py {' '.join(sys.argv[1:])} > docs/config.md` (a test checks it is current).\n")
    for script in sys.argv[1:]:  # the scripts' CHOICES come from importing them (their main() does not run)
        print(describe(script, getattr(importlib.import_module(script.removesuffix(".py")), "CHOICES", {})))
