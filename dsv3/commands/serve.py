"""`dsv3 serve`: an OpenAI-compatible HTTP server (chat completions, completions, models, health, metrics)."""
from __future__ import annotations

import logging
import os

from ._common import add_model_args, make_llm

log = logging.getLogger("dsv3.serve")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, "
                                   "POST /v1/completions, GET /v1/models, GET /health, GET /metrics). Sampling "
                                   "fields a request leaves out take the checkpoint's generation_config.json "
                                   "values (temperature, top_p, top_k, min_p, penalties), then OpenAI's defaults.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--served-model-name", help="the model name clients send (default: the checkpoint directory's "
                                                "name)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV3_API_KEY; "
                                     "none when unset)")
    g.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting for a batch slot before new ones get 429 (default 1024)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before aborting them")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    g.add_argument("--tool-call-parser", default="auto",
                   choices=["auto", "none", "deepseek_v3", "deepseek_v31", "kimi_k2"],
                   help="the format tool calls are read in with tool_choice auto (default: read from the chat "
                        "template; none: never parse calls)")
    g.add_argument("--reasoning-parser", default="auto", choices=["auto", "none", "think"],
                   help="split <think>...</think> into reasoning_content (default: when the chat template knows "
                        "the tags)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        raise RuntimeError(f"dsv3 serve needs the server extras ({e}); install them with "
                           "pip install 'dsv3[serve]'") from e
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("DSV3_API_KEY") or None
    llm = make_llm(args, max_waiting=args.max_queue)
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.path))
    app = create_app(llm.engine, name, api_key, shutdown_grace=1.0, tool_call_parser=args.tool_call_parser,
                     reasoning_parser=args.reasoning_parser, sampling_defaults=llm.generation_defaults)
    # The engine aborts what is still running after --shutdown-timeout; uvicorn waits a little longer, so the
    # aborted handlers can still answer (503 / an error event) before it cancels them.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=args.access_log,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5.0, lifespan="on")
    server = _server_class(uvicorn)(config)
    server.dsv3_banner = (name, api_key is not None)
    server.dsv3_engine = app.state.server.engine
    server.dsv3_grace = args.shutdown_timeout
    server.run()
    return 0 if server.started else 1


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """Logs the URL clients should use once the socket listens; on SIGINT/SIGTERM stops taking requests,
        lets in-flight ones finish for the grace period, then aborts the rest."""

        async def shutdown(self, sockets=None) -> None:
            if self.dsv3_engine.alive:
                self.dsv3_engine.drain(self.dsv3_grace)
            await super().shutdown(sockets)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.started:
                return
            name, keyed = self.dsv3_banner
            host, port = self.config.host, self.config.port
            for server in self.servers:
                for sock in server.sockets:
                    port = sock.getsockname()[1]  # the real one when --port 0 let the OS pick
            shown = f"[{host}]" if ":" in host else host
            log.info("serving %r at http://%s:%d/v1 (OpenAI-compatible%s); metrics at /metrics", name, shown, port,
                     ", API key required" if keyed else "")

    return Server
