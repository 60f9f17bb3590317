"""The device's local API: the FastAPI app (auth, the extensions, the web app), the
OpenAI-compatible chat routes, OpenAI's error shape, and the web app's static files."""
