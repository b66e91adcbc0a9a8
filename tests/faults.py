"""Fault injection shared by the scheduler and server tests."""


def fault_on_temperature(monkeypatch, engine, temperature):
    """Make the backend's sampler raise for requests with this temperature (a legal value: the
    fault stands in for any per-request failure the validation cannot foresee)."""
    be = engine.model.be
    real = be.sample

    def sample(logits, temp, *args, **kw):
        if abs(float(temp.reshape(-1)[0]) - temperature) < 1e-6:
            raise RuntimeError("injected sampling fault")
        return real(logits, temp, *args, **kw)

    monkeypatch.setattr(be, "sample", sample)
