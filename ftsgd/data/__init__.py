"""Image folders as datasets: discovery, decoding, the pre-flight scan, transforms and loaders."""

from ftsgd import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "Split": "folders",
        "discover_splits": "folders",
        "preflight_scan": "scan",
        "build_transform": "transforms",
        "RunLoader": "loader",
        "build_loader": "loader",
        "make_image_folder": "synthetic",
    },
)
