"""An OpenAI-compatible HTTP server over the batch scheduler (FastAPI + uvicorn).

    moe-offload serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]

`create_app(model, ServeConfig(...))` builds the ASGI app (serve/app.py has the routes), `engine` is the
thread that steps the BatchScheduler, `chat` renders chat templates from tokenizer_config.json,
`http` is uvicorn's h11 protocol with a header timeout (`uvicorn_config`).
"""

from .app import ServeConfig, create_app
from .chat import ChatTemplate
from .engine import Engine
from .http import uvicorn_config

__all__ = ["ChatTemplate", "Engine", "ServeConfig", "create_app", "uvicorn_config"]
