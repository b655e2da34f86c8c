"""RQ job functions and worker entry points (thin: load spec, call ``service``, report)."""
