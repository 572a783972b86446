"""slimcompile: a torch.compile backend ("slim") that prunes prompt tokens at intermediate layers.

    fast = torch.compile(model, backend="slim", options={...})   # forward only
    slimcompile.compile(model, **options)                         # also model.generate(...)
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

_LAZY = {
    "COMPILATIONS": "slimcompile.backend", "slim_backend": "slimcompile.backend",
    "compile": "slimcompile.generation", "uncompile": "slimcompile.generation",
    "DEFAULTS": "slimcompile.options", "SlimOptionError": "slimcompile.options", "parse_options": "slimcompile.options",
}
__all__ = ["COMPILATIONS", "DEFAULTS", "SlimOptionError", "compile", "parse_options", "slim_backend", "uncompile"]


def __getattr__(name):  # the `slimcompile` command imports these only when a subcommand needs them
    if name in _LAZY:
        import importlib

        from slimcompile.hf_compat import check_versions

        check_versions()
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimcompile' has no attribute {name!r}")


# The `slimcompile` console command parses its flags before importing torch (`--help` in well under
# a second); every other import of the package loads everything at once, as before.
if _os.path.basename(_sys.argv[0] if _sys.argv else "").split(".")[0] != "slimcompile":
    from slimcompile.hf_compat import check_versions as _check_versions  # noqa: E402

    _check_versions()

    from slimcompile.backend import COMPILATIONS, slim_backend  # noqa: E402
    from slimcompile.generation import compile, uncompile  # noqa: E402,A001
    from slimcompile.options import DEFAULTS, SlimOptionError, parse_options  # noqa: E402
