"""The networks: :mod:`~napari_mae.models.mae` (the masked autoencoder on MONAI, its presets,
loading, device and precision choice).

Importing this package imports nothing heavy; import the submodule you need.
"""
