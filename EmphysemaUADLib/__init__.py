"""EmphysemaUAD: unsupervised emphysema detection and staging on chest CT."""

__version__ = "0.1.0"
