"""HTTP front end (FastAPI). Thin: routes validate, call ``service``, return public schemas."""
