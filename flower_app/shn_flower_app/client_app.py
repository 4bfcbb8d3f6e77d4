"""ClientApp: ``flwr run`` loads ``app`` (see pyproject.toml)."""

from shn.flower.engine import make_client_app

app = make_client_app()
