"""ServerApp: ``flwr run`` loads ``app`` (see pyproject.toml)."""

from pathlib import Path

from shn.flower.engine import make_server_app

app = make_server_app(app_dir=Path(__file__).resolve().parents[1])
