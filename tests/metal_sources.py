"""The Metal translation units exactly as a Mac compiles them when its build had no Metal compiler:
metal/<stem>.metal with every quoted #include (ours and MLX's kernel headers) expanded by
csrc/metal/embed_sources.py, the generator CMake runs to embed them in the extension. Written once per
content into the emulator's cache directory; the emulator tests (metal_plan_testing.METAL, ...) and the
macOS static checks compile these files, so what they run is the text eval_gpu hands to Metal's run-time
compiler."""
import hashlib
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(ROOT / "csrc" / "metal"))
import embed_sources  # noqa: E402

STEMS = ("sdpa_int4", "sdpa_int4_prefill", "sdpa_int4_copy")  # csrc/metal/dispatch_plan.h kLibraries


def expanded_text(stem: str, mlx_include) -> str:
    return embed_sources.expand([ROOT / "metal" / f"{stem}.metal"], [Path(mlx_include)], ROOT)


def expanded(stem: str, mlx_include=None) -> Path:
    """Path of metal/<stem>.metal's expansion (the installed mlx's headers unless mlx_include is given)."""
    from mslemu import cache_dir
    from mslemu.testing import mlx_include as find_mlx_include

    text = expanded_text(stem, mlx_include or find_mlx_include())
    d = cache_dir() / "expanded" / hashlib.sha256(text.encode()).hexdigest()[:16]
    path = d / f"{stem}.metal"
    if not path.exists():
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: concurrent test processes write identical files
    return path
