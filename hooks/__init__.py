"""Model adapters and hooks (see README, Layout)."""

from hooks import progress as _progress  # noqa: F401  (in a notebook kernel: no widget-bar warnings)
