"""napari-mae: masked-autoencoder learning and adaptive segmentation for napari.

The core modules (``masking``, ``model``, ``reconstruction``, ``training``,
``features``, ``segmentation``, ``metrics``, ``io``) import no Qt and no napari;
only ``napari_mae.widgets`` and the npe2 contribution modules (``_reader``,
``_sample_data``) do.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
