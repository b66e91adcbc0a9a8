"""Built-in device plugins (installed as ``kt_backends``), registered through the
``kt_core.backends`` entry-point group exactly as an external vendor wheel would be."""
