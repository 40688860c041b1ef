def __getattr__(name: str):
    """Lazy exports keep `import leworld` light (no torch until needed)."""
    if name == "load_model":
        from leworld.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'leworld' has no attribute {name!r}")
