"""A live kt server for the server tests: started in a background thread of the test process."""
import signal
import socket
import threading
import time

import httpx

import kt_core
from kt_core.server.app import ServerState, make_server

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512)
CONTEXT = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A kt server in a background thread of this process."""

    def __init__(self, model_path, tmp, *overrides, env_key=None):
        self.port = free_port()
        ov = ["model.dtype=float32", f"model.max_seq_len={CONTEXT}", "server.max_batch=8", "server.prefix_host_gb=0",
              f"server.prefix_disk_dir={tmp}", "server.prefix_disk_gb=1", f"server.port={self.port}", *overrides]
        cfg_batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("server.max_batch=")), 8)
        engine = kt_core.Engine.from_pretrained(model_path, overrides=ov, max_batch=cfg_batch)
        self.state = ServerState.for_engine(engine, default_id="tiny")
        self.server = make_server(self.state, "127.0.0.1", self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        import openai

        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=env_key or "none", max_retries=0)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics", headers=self.headers()).text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def headers(self):
        return {"Authorization": f"Bearer {self.client.api_key}"}

    def stop(self):
        self.server.handle_exit(signal.SIGINT, None)
        self.thread.join(60)
        assert not self.thread.is_alive(), "server did not shut down"


class slow_steps:
    """Make every forward step of a live server take at least ``delay`` seconds (the model
    still computes; this only stretches time so timeouts and disconnects happen mid-request)."""

    def __init__(self, srv: Live, delay: float = 0.02):
        self.model, self.delay = srv.state.engine.model, delay

    def __enter__(self):
        real = type(self.model).forward

        def forward(batch, cache):
            time.sleep(self.delay)
            return real(self.model, batch, cache)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward
