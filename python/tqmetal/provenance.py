"""What a benchmark or report records about the software it ran on."""

from __future__ import annotations


def package_versions(packages=("mlx", "mlx-cpu", "mlx-lm", "tqmetal")) -> dict:
    """Installed versions of ``packages`` (None where one is not installed)."""
    from importlib import metadata

    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
