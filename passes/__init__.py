"""Built-in rewriting passes, one per module; importing this package registers them."""
from . import (
    fuse,  # noqa: F401
    lazy_cache,  # noqa: F401
    quantize,  # noqa: F401
)
