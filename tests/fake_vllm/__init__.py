"""Install the fake `vllm` package (tests/fake_vllm/vllm) for the duration of a block."""

import contextlib
import sys
from pathlib import Path

DIR = str(Path(__file__).parent)


@contextlib.contextmanager
def installed():
    """Make `import vllm` find the fake; restore sys.path and sys.modules afterwards."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "vllm" or name.startswith("vllm.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, DIR)
    try:
        yield
    finally:
        sys.path.remove(DIR)
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved)
