"""macOS static checks of tqmetal that run on Linux: see checks.py."""
