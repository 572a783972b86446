"""slimcompile: a torch.compile backend ("slim") that prunes prompt tokens at intermediate layers.

    fast = torch.compile(model, backend="slim", options={...})   # forward only
    slimcompile.compile(model, **options)                         # also model.generate(...)
"""

__version__ = "0.1.0"

from slimcompile.hf_compat import check_versions as _check_versions  # noqa: E402

_check_versions()

from slimcompile.backend import COMPILATIONS, slim_backend  # noqa: E402
from slimcompile.generation import compile, uncompile  # noqa: E402,A001
from slimcompile.options import DEFAULTS, SlimOptionError, parse_options  # noqa: E402

__all__ = ["COMPILATIONS", "DEFAULTS", "SlimOptionError", "compile", "parse_options", "slim_backend", "uncompile"]
