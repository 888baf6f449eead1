"""Published OPT configurations, shipped as data (no hub access needed)."""
