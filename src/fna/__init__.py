"""FNA: fast neural network adaptation."""


def load(path):
    """Rebuild a model saved as ``model.fna.pt``: returns ``(model, info)`` (see :mod:`fna.artifact`)."""
    from fna.artifact import load_model

    return load_model(path)
