"""Reconstruction-based PTQ front end: AdaRound, BRECQ, QDrop, network-wise, MRECG merges, AdaQTransform.

Entry point::

    qm, report = reconstruct(model, calib_images, QuantConfig(4, 4), ReconSettings(method="qdrop"))
    graph = fold_to_integer(qm)          # exact integer graph (xi / eta folded, Eq. 9)
    report.save(out_dir)                 # recon_loss.json + recon_loss.png

See docs/reconstruction.md.
"""

from .recon import (GRANULARITIES, METHODS, ReconReport, ReconSettings, default_lambda, reconstruct,
                    stages_for)
from .units import Unit, block_units, discover_units, layer_units, network_unit

__all__ = ["reconstruct", "ReconSettings", "ReconReport", "METHODS", "GRANULARITIES", "Unit", "discover_units",
           "block_units", "layer_units", "network_unit", "default_lambda", "stages_for"]
