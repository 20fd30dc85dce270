"""Replicas on Ray Serve (the optional `[ray]` extra): `serve run tuneserve.deploy:app`.

`app` is built on first access from the environment: TUNESERVE_DEPLOY_CONFIG (a YAML or JSON file, see
config.py), else TUNESERVE_MODEL and TUNESERVE_REPLICAS. Importing this package does not import Ray.
"""

from __future__ import annotations

RAY_MISSING = "Ray Serve is not installed: pip install 'tuneserve[ray]'"


def require_ray() -> None:
    """Raise ImportError saying how to install Ray Serve, if it is missing."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e


def __getattr__(name: str):  # noqa: ANN202 - lazy: the application is built only when asked for
    if name == "app":
        require_ray()
        from tuneserve.deploy.application import build_app
        from tuneserve.deploy.config import DeployConfig

        return build_app(DeployConfig.from_env())
    raise AttributeError(name)
