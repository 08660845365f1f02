"""Print the CUTLASS include directory (the one holding ``cutlass/cutlass.h``).

Looks at ``$KNSPARSE_CUTLASS_INCLUDE`` first, then at the headers the ``nvidia-cutlass`` PyPI
package ships under ``cutlass_library/source/include`` (found without importing the package,
so ``pip install --no-deps nvidia-cutlass`` is enough). Exits 1 with a reason on stderr when
there is none. Run by CMakeLists.txt's configure step (`make cuda`) and by the tests.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def cutlass_include_dir() -> str | None:
    """The CUTLASS include directory, or None."""
    explicit = os.environ.get("KNSPARSE_CUTLASS_INCLUDE")
    candidates = [explicit] if explicit else []
    if not explicit:
        spec = importlib.util.find_spec("cutlass_library")
        locations = spec.submodule_search_locations if spec is not None else None
        candidates = [os.path.join(base, "source", "include") for base in locations or []]
    for include in candidates:
        if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
            return include
    return None


if __name__ == "__main__":
    include = cutlass_include_dir()
    if include is None:
        sys.stderr.write(
            "no CUTLASS headers: install them with `pip install --no-deps nvidia-cutlass` "
            "or point KNSPARSE_CUTLASS_INCLUDE at a CUTLASS include directory\n"
        )
        sys.exit(1)
    print(include)
