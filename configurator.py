"""
The configurator every script shares (nanoGPT's idea, as a function): the script's upper-case-free
module constants are the config; a Python file named on the command line overrides them, then
--key=value flags do. Values are parsed as Python literals and must keep the default's type.

    python train.py config/demo.py --learning_rate=3e-4 --output_dir='"out/x"'
"""
import ast
import sys


def configure(defaults, argv=None):
    """defaults: the script's globals(); the config keys are its names of plain values that do not start
    with '_'. Updates defaults in place and returns the resulting config dict."""
    keys = [k for k, v in defaults.items() if not k.startswith("_") and k.islower() and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            scope = {}
            with open(arg) as fh:
                exec(fh.read(), {}, scope)
            for k, v in scope.items():
                if not k.startswith("_"):
                    set_key(defaults, keys, k, v, arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string: --output_dir=out/x
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
