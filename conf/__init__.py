"""kt-core's Hydra configs (installed as the ``kt_conf`` package)."""
